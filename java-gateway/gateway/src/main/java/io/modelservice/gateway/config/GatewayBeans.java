package io.modelservice.gateway.config;

import io.modelservice.gateway.ratelimit.InMemoryCallerBudgets;
import io.modelservice.gateway.ratelimit.CallerBudgets;
import org.springframework.boot.autoconfigure.condition.ConditionalOnProperty;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

@Configuration(proxyBeanMethods = false)
public class GatewayBeans {

    /** In-memory limits (one replica); {@code llm-gateway.budgets.store=redis} shares them across replicas instead
     *  ({@code ratelimit.BudgetStoreConfiguration}). */
    @Bean
    @ConditionalOnProperty(name = "llm-gateway.budgets.store", havingValue = "memory", matchIfMissing = true)
    public CallerBudgets callerBudgets() {
        return new InMemoryCallerBudgets();
    }
}
