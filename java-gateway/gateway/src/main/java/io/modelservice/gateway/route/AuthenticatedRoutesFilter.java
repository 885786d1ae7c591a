package io.modelservice.gateway.route;

import io.modelservice.gateway.web.GatewayAttributes;
import io.modelservice.gateway.web.OpenAiErrors;
import org.springframework.cloud.gateway.filter.GatewayFilterChain;
import org.springframework.cloud.gateway.filter.GlobalFilter;
import org.springframework.core.Ordered;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import reactor.core.publisher.Mono;

/**
 * Every route, whatever its path, requires a caller the edge filter authenticated: a request that reached a route
 * without one (a path the edge did not recognise as an API path) gets 401 and never reaches a pod. The edge filter
 * authenticates; this makes "authenticated" a property of every route rather than of a path prefix.
 */
@Component
public class AuthenticatedRoutesFilter implements GlobalFilter, Ordered {

    private final OpenAiErrors errors;

    public AuthenticatedRoutesFilter(OpenAiErrors errors) {
        this.errors = errors;
    }

    @Override
    public int getOrder() {
        return Ordered.HIGHEST_PRECEDENCE;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, GatewayFilterChain chain) {
        if (exchange.getAttribute(GatewayAttributes.CALLER) != null) {
            return chain.filter(exchange);
        }
        return errors.reject(exchange, OpenAiErrors.unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."), "unauthenticated_route");
    }
}
