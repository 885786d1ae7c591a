package io.modelservice.gateway.web;

import com.fasterxml.jackson.databind.ObjectMapper;
import io.modelservice.gateway.config.GatewayProperties;
import org.springframework.core.Ordered;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import reactor.core.publisher.Mono;

/**
 * Puts a {@link UsageSettlingResponse} around the response of an admitted request: a {@code usage.UsageTap} reads
 * the answer's usage as it passes (never buffering a stream) and the request's {@link TokenReservation} is settled
 * with it before the end of the answer reaches the client. Also removes the usage-only chunk that
 * {@link RequestBodyFilter} asked for when the client had not, and bounds the silence inside a stream
 * ({@code stream-idle-timeout}).
 */
@Component
public class UsageDebitFilter implements WebFilter, Ordered {

    private final GatewayProperties properties;
    private final OpenAiErrors errors;
    private final ObjectMapper json;

    public UsageDebitFilter(GatewayProperties properties, OpenAiErrors errors, ObjectMapper json) {
        this.properties = properties;
        this.errors = errors;
        this.json = json;
    }

    @Override
    public int getOrder() {
        return EdgeOrder.USAGE_DEBIT;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
        TokenReservation reservation = exchange.getAttribute(GatewayAttributes.RESERVATION);
        if (reservation == null) {
            return chain.filter(exchange);
        }
        boolean injectedUsage = Boolean.TRUE.equals(exchange.getAttribute(GatewayAttributes.STREAM_USAGE_INJECTED));
        return chain.filter(exchange.mutate()
                .response(new UsageSettlingResponse(exchange.getResponse(), reservation, injectedUsage,
                        properties.streamIdleTimeout(), errors, json))
                .build());
    }
}
