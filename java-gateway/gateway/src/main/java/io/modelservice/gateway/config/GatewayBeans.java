package io.modelservice.gateway.config;

import io.modelservice.gateway.ratelimit.InMemoryCallerBudgets;
import io.modelservice.gateway.ratelimit.CallerBudgets;
import org.springframework.boot.autoconfigure.condition.ConditionalOnMissingBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

@Configuration(proxyBeanMethods = false)
public class GatewayBeans {

    /** In-memory limits; provide another {@link CallerBudgets} bean (e.g. Redis-backed) to share them across replicas. */
    @Bean
    @ConditionalOnMissingBean(CallerBudgets.class)
    public CallerBudgets callerBudgets() {
        return new InMemoryCallerBudgets();
    }
}
