package io.modelservice.gateway.config;

import io.modelservice.gateway.ratelimit.InMemoryRateLimiter;
import io.modelservice.gateway.ratelimit.RateLimiter;
import org.springframework.boot.autoconfigure.condition.ConditionalOnMissingBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

@Configuration(proxyBeanMethods = false)
public class GatewayBeans {

    /** In-memory limits; provide another {@link RateLimiter} bean (e.g. Redis-backed) to share them across replicas. */
    @Bean
    @ConditionalOnMissingBean(RateLimiter.class)
    public RateLimiter rateLimiter() {
        return new InMemoryRateLimiter();
    }
}
