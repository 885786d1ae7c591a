package io.modelservice.gateway.route;

import java.io.IOException;
import java.net.URI;
import java.util.LinkedHashSet;
import java.util.Set;
import java.util.concurrent.TimeUnit;

import io.github.resilience4j.circuitbreaker.CircuitBreaker;
import io.modelservice.gateway.config.GatewayProperties;
import io.modelservice.gateway.web.GatewayAttributes;
import io.modelservice.gateway.web.GatewayMetrics;
import org.springframework.cloud.client.ServiceInstance;
import org.springframework.cloud.client.loadbalancer.Response;
import org.springframework.cloud.gateway.filter.GatewayFilterChain;
import org.springframework.cloud.gateway.filter.GlobalFilter;
import org.springframework.cloud.gateway.filter.ReactiveLoadBalancerClientFilter;
import org.springframework.cloud.gateway.support.ServerWebExchangeUtils;
import org.springframework.core.Ordered;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import reactor.core.publisher.Mono;

/**
 * Runs right after the load balancer picked an instance, for each attempt: records the instance as tried (so a
 * retry picks another) and feeds the instance's circuit breaker with the outcome: a connect error or one of
 * {@code resilience.failure-statuses} (502/503/504: "this pod is unhealthy") is a failure; anything else, a plain
 * 500 and 4xx included, says something about the request, not the pod. Refuses any target outside the allowed
 * networks (the load balancer already drops those; this holds for any route). The attempt ends when the response
 * headers arrive, before any byte is written to the client.
 */
@Component
public class InstanceAttemptFilter implements GlobalFilter, Ordered {

    public static final int ORDER = ReactiveLoadBalancerClientFilter.LOAD_BALANCER_CLIENT_FILTER_ORDER + 1;

    private final InstanceBreakers breakers;
    private final GatewayMetrics metrics;
    private final UpstreamAllowlist allowlist;
    private final Set<Integer> failureStatuses;

    public InstanceAttemptFilter(InstanceBreakers breakers, GatewayMetrics metrics, UpstreamAllowlist allowlist,
                                 GatewayProperties properties) {
        this.breakers = breakers;
        this.metrics = metrics;
        this.allowlist = allowlist;
        this.failureStatuses = Set.copyOf(properties.resilience().failureStatuses());
    }

    @Override
    public int getOrder() {
        return ORDER;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, GatewayFilterChain chain) {
        URI target = exchange.getAttribute(ServerWebExchangeUtils.GATEWAY_REQUEST_URL_ATTR);
        if (target != null && target.getHost() != null && !allowlist.admits(target.getHost(), target.getPort())) {
            metrics.upstreamAttempt("not_allowed");
            return Mono.error(new InstanceUnavailableException("upstream " + target.getHost()
                    + " is outside llm-gateway.upstream.allowed-networks"));
        }
        Response<ServiceInstance> chosen =
                exchange.getAttribute(ServerWebExchangeUtils.GATEWAY_LOADBALANCER_RESPONSE_ATTR);
        if (chosen == null || !chosen.hasServer()) {
            return chain.filter(exchange);
        }
        String key = InstanceBreakers.key(chosen.getServer());
        Set<String> tried = exchange.getAttribute(GatewayAttributes.TRIED_INSTANCES);
        if (tried == null) {
            tried = new LinkedHashSet<>();
            exchange.getAttributes().put(GatewayAttributes.TRIED_INSTANCES, tried);
        }
        tried.add(key);
        exchange.getAttributes().put(GatewayAttributes.UPSTREAM, key);
        CircuitBreaker breaker = breakers.forInstance(key);
        if (!breaker.tryAcquirePermission()) {
            metrics.upstreamAttempt("circuit_open");
            return Mono.error(new InstanceUnavailableException("circuit open for instance " + key));
        }
        long started = System.nanoTime();
        return chain.filter(exchange)
                .doOnSuccess(v -> {
                    long took = System.nanoTime() - started;
                    var status = exchange.getResponse().getStatusCode();
                    if (status != null && failureStatuses.contains(status.value())) {
                        breaker.onError(took, TimeUnit.NANOSECONDS, new UpstreamStatusException(status.value()));
                        metrics.upstreamAttempt("status_" + status.value());
                    } else {
                        breaker.onSuccess(took, TimeUnit.NANOSECONDS);
                        metrics.upstreamAttempt("ok");
                    }
                })
                .doOnError(e -> {
                    breaker.onError(System.nanoTime() - started, TimeUnit.NANOSECONDS, e);
                    metrics.upstreamAttempt("error");
                })
                .doOnCancel(breaker::releasePermission);
    }

    /** A retryable refusal: the retry filter retries IOExceptions on another instance. */
    public static class InstanceUnavailableException extends IOException {
        public InstanceUnavailableException(String message) {
            super(message);
        }
    }

    /** The failure recorded for an answer that says the pod is unhealthy. */
    public static class UpstreamStatusException extends RuntimeException {
        public UpstreamStatusException(int status) {
            super("upstream answered " + status);
        }
    }
}
