package io.modelservice.gateway.route;

import io.github.resilience4j.circuitbreaker.CircuitBreaker;
import io.github.resilience4j.circuitbreaker.CircuitBreakerConfig;
import io.github.resilience4j.circuitbreaker.CircuitBreakerRegistry;
import io.github.resilience4j.micrometer.tagged.TaggedCircuitBreakerMetrics;
import io.micrometer.core.instrument.MeterRegistry;
import io.modelservice.gateway.config.GatewayProperties;
import org.springframework.cloud.client.ServiceInstance;
import org.springframework.stereotype.Component;

/**
 * One Resilience4j circuit breaker per model-service instance ("host:port"): an instance that keeps failing
 * (connect errors, 5xx) is skipped by the load balancer until its breaker lets trial calls through again.
 */
@Component
public class InstanceBreakers {

    private final CircuitBreakerRegistry registry;

    public InstanceBreakers(GatewayProperties properties, MeterRegistry meterRegistry) {
        GatewayProperties.Resilience r = properties.getResilience();
        CircuitBreakerConfig config = CircuitBreakerConfig.custom()
                .failureRateThreshold(r.getFailureRateThreshold())
                .slidingWindowType(CircuitBreakerConfig.SlidingWindowType.COUNT_BASED)
                .slidingWindowSize(r.getSlidingWindowSize())
                .minimumNumberOfCalls(r.getMinimumNumberOfCalls())
                .waitDurationInOpenState(r.getOpenStateWait())
                .automaticTransitionFromOpenToHalfOpenEnabled(true)
                .permittedNumberOfCallsInHalfOpenState(2)
                .build();
        this.registry = CircuitBreakerRegistry.of(config);
        TaggedCircuitBreakerMetrics.ofCircuitBreakerRegistry(registry).bindTo(meterRegistry);
    }

    public static String key(ServiceInstance instance) {
        return instance.getHost() + ":" + instance.getPort();
    }

    public static String key(String host, int port) {
        return host + ":" + port;
    }

    public CircuitBreaker forInstance(String key) {
        return registry.circuitBreaker("instance-" + key);
    }

    /** Whether the instance may take a call now (its breaker is not open). */
    public boolean admits(ServiceInstance instance) {
        return forInstance(key(instance)).getState() != CircuitBreaker.State.OPEN;
    }
}
