package io.modelservice.gateway.web;

import org.springframework.core.Ordered;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import reactor.core.publisher.Mono;

/**
 * 404 for the gateway's internal paths ({@code /__gateway/**}: the fallback routes and the fallback answer) when a
 * client asks for them; the gateway reaches them only by internal forwards, which do not pass the web filters.
 */
@Component
public class InternalPathFilter implements WebFilter, Ordered {

    public static final String INTERNAL_PREFIX = "/__gateway/";

    private final OpenAiErrors errors;

    public InternalPathFilter(OpenAiErrors errors) {
        this.errors = errors;
    }

    @Override
    public int getOrder() {
        return EdgeOrder.INTERNAL_PATH;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
        String path = exchange.getRequest().getPath().pathWithinApplication().value();
        if (path.startsWith(INTERNAL_PREFIX) || path.equals(INTERNAL_PREFIX.substring(0, INTERNAL_PREFIX.length() - 1))) {
            return errors.reject(exchange, OpenAiErrors.notFound(path), "unknown_url");
        }
        return chain.filter(exchange);
    }
}
