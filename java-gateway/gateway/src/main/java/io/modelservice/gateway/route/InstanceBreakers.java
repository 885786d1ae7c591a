package io.modelservice.gateway.route;

import io.github.resilience4j.circuitbreaker.CircuitBreaker;
import io.github.resilience4j.circuitbreaker.CircuitBreakerConfig;
import io.github.resilience4j.circuitbreaker.CircuitBreakerRegistry;
import io.github.resilience4j.micrometer.tagged.TaggedCircuitBreakerMetrics;
import io.micrometer.core.instrument.MeterRegistry;
import org.springframework.cloud.client.ServiceInstance;
import org.springframework.stereotype.Component;

/**
 * One Resilience4j circuit breaker per model-service instance ("host:port"): an instance that keeps failing
 * (connect errors, {@code resilience.failure-statuses}) is skipped by the load balancer until its breaker lets trial
 * calls through again. Tuned by {@code resilience4j.circuitbreaker.configs.instance} (application.yml; falls back
 * to {@code configs.default}). The breakers live in their own registry, apart from the route breakers of Spring
 * Cloud CircuitBreaker, so that an instance key never picks up a route's configuration.
 */
@Component
public class InstanceBreakers {

    /** The name of the Resilience4j configuration ({@code resilience4j.circuitbreaker.configs.<name>}). */
    public static final String CONFIG = "instance";

    private final CircuitBreakerRegistry registry;

    public InstanceBreakers(CircuitBreakerRegistry configured, MeterRegistry meterRegistry) {
        CircuitBreakerConfig config = configured.getConfiguration(CONFIG).orElseGet(configured::getDefaultConfig);
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
