package io.modelservice.gateway.route;

import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;

import io.modelservice.gateway.web.EdgeOrder;
import org.springframework.cloud.client.ServiceInstance;
import org.springframework.cloud.client.loadbalancer.Response;
import org.springframework.cloud.gateway.filter.GatewayFilterChain;
import org.springframework.cloud.gateway.filter.GlobalFilter;
import org.springframework.cloud.gateway.filter.ReactiveLoadBalancerClientFilter;
import org.springframework.cloud.gateway.support.ServerWebExchangeUtils;
import org.springframework.core.Ordered;
import org.springframework.http.HttpMethod;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import reactor.core.publisher.Mono;

/**
 * This gateway's attempts in flight per instance ({@link PodLoads}): an attempt starts when the load balancer picks
 * the instance and ends with the exchange (a stream: when its last byte is written), or at once when it fails and
 * is retried elsewhere. The gateway route chain completes when the response headers arrive, so the end of an
 * answer is taken from the whole exchange ({@link ExchangeEnd}).
 */
@Component
public class InFlightAttempts implements GlobalFilter, Ordered {

    static final String ENDINGS = InFlightAttempts.class.getName() + ".endings";

    private final PodLoads loads;

    public InFlightAttempts(PodLoads loads) {
        this.loads = loads;
    }

    @Override
    public int getOrder() {
        return ReactiveLoadBalancerClientFilter.LOAD_BALANCER_CLIENT_FILTER_ORDER + 2;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, GatewayFilterChain chain) {
        Response<ServiceInstance> chosen =
                exchange.getAttribute(ServerWebExchangeUtils.GATEWAY_LOADBALANCER_RESPONSE_ATTR);
        List<Runnable> endings = exchange.getAttribute(ENDINGS);
        // only generation requests (POST) take a place in a pod's batch and show in its numbers
        if (chosen == null || !chosen.hasServer() || endings == null
                || exchange.getRequest().getMethod() != HttpMethod.POST) {
            return chain.filter(exchange);
        }
        PodLoads.Attempt attempt = loads.started(chosen.getServer());
        endings.add(() -> loads.ended(attempt));
        return chain.filter(exchange)
                .doOnError(e -> loads.ended(attempt))     // failed: retried elsewhere, or answered with an error
                .doOnCancel(() -> loads.ended(attempt));
    }

    /** Ends the exchange's attempts when the whole exchange is over (after the answer's last byte). */
    @Component
    public static class ExchangeEnd implements WebFilter, Ordered {

        @Override
        public int getOrder() {
            return EdgeOrder.ATTEMPTS_END;
        }

        @Override
        public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
            List<Runnable> endings = new CopyOnWriteArrayList<>();
            exchange.getAttributes().put(ENDINGS, endings);
            return chain.filter(exchange).doFinally(signal -> endings.forEach(Runnable::run));
        }
    }
}
