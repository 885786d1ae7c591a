package io.modelservice.gateway.web;

import io.modelservice.gateway.auth.AuthenticationException;
import io.modelservice.gateway.auth.Authenticator;
import io.modelservice.gateway.auth.Caller;
import org.springframework.core.Ordered;
import org.springframework.http.HttpHeaders;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import reactor.core.publisher.Mono;

/**
 * Authenticates every {@code /v1/**} request (API key or JWT, see {@link Authenticator}) and sets
 * {@link GatewayAttributes#CALLER}; 401 otherwise. The filters after it act only on requests with a caller, and every
 * route requires one ({@code route.AuthenticatedRoutesFilter}). Runs after {@link CanonicalPathFilter}, so the path
 * it looks at is the path the routes match. The caller's credentials never go upstream
 * ({@code route.UpstreamHeaders}).
 */
@Component
public class CallerAuthenticationFilter implements WebFilter, Ordered {

    private final Authenticator authenticator;
    private final OpenAiErrors errors;

    public CallerAuthenticationFilter(Authenticator authenticator, OpenAiErrors errors) {
        this.authenticator = authenticator;
        this.errors = errors;
    }

    @Override
    public int getOrder() {
        return EdgeOrder.AUTHENTICATION;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
        String path = exchange.getRequest().getPath().pathWithinApplication().value();
        if (!path.equals("/v1") && !path.startsWith("/v1/")) {
            return chain.filter(exchange);
        }
        exchange.getAttributes().put(GatewayAttributes.ORIGINAL_PATH, path);
        Caller caller;
        try {
            caller = authenticator.authenticate(exchange.getRequest().getHeaders().getFirst(HttpHeaders.AUTHORIZATION));
        } catch (AuthenticationException e) {
            return errors.reject(exchange, OpenAiErrors.unauthorized(e.getMessage()), "unauthenticated");
        }
        exchange.getAttributes().put(GatewayAttributes.CALLER, caller);
        return chain.filter(exchange);
    }
}
