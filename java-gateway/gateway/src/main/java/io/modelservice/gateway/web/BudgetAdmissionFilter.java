package io.modelservice.gateway.web;

import io.modelservice.gateway.auth.Caller;
import io.modelservice.gateway.config.GatewayProperties;
import io.modelservice.gateway.ratelimit.CallerBudgets;
import org.springframework.core.Ordered;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import reactor.core.publisher.Mono;
import reactor.core.publisher.SignalType;

/**
 * Admits an authenticated request against its caller's budgets ({@link CallerBudgets}), taking a token reservation
 * at once: the prompt estimate ({@code ceil(body bytes / budget.prompt-bytes-per-token)}) plus the completion cap
 * (the request's {@code max_completion_tokens} / {@code max_tokens}, else {@code budget.default-max-tokens}); a
 * request without a body reserves nothing. Over budget: 429 with Retry-After. The reservation
 * ({@link GatewayAttributes#RESERVATION}) is settled by {@link UsageDebitFilter} with the answer's usage, and here
 * when the exchange ends without it, so it is always settled exactly once.
 */
@Component
public class BudgetAdmissionFilter implements WebFilter, Ordered {

    private final GatewayProperties.Budget budget;
    private final CallerBudgets budgets;
    private final GatewayMetrics metrics;
    private final OpenAiErrors errors;

    public BudgetAdmissionFilter(GatewayProperties properties, CallerBudgets budgets, GatewayMetrics metrics,
                                 OpenAiErrors errors) {
        this.budget = properties.budget();
        this.budgets = budgets;
        this.metrics = metrics;
        this.errors = errors;
    }

    @Override
    public int getOrder() {
        return EdgeOrder.BUDGET_ADMISSION;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
        Caller caller = exchange.getAttribute(GatewayAttributes.CALLER);
        if (caller == null) {
            return chain.filter(exchange);
        }
        Integer bodySize = exchange.getAttribute(GatewayAttributes.BODY_SIZE);
        long promptEstimate = bodySize == null ? 0 : promptEstimate(bodySize);
        long reserved = bodySize == null ? 0 : promptEstimate + completionCap(exchange);
        // asynchronous: a shared store (Redis) answers without blocking this event loop
        return budgets.admitAsync(caller, reserved).flatMap(decision ->
                forwardIfAdmitted(exchange, chain, caller, promptEstimate, reserved, decision));
    }

    private Mono<Void> forwardIfAdmitted(ServerWebExchange exchange, WebFilterChain chain, Caller caller,
                                         long promptEstimate, long reserved, CallerBudgets.Decision decision) {
        if (!decision.allowed()) {
            metrics.rateLimited(caller, decision.limit());
            String message = "Rate limit reached for " + caller.name() + " on " + decision.limit() + " per minute ("
                    + (decision.limit().equals("tokens") ? caller.tokensPerMinute() : caller.requestsPerMinute())
                    + "). Please try again in " + decision.retryAfterSeconds() + "s.";
            return errors.reject(exchange, new OpenAiErrors.ApiError(429, message, decision.limit(), null,
                    "rate_limit_exceeded", decision.retryAfterSeconds()), "rate_limited");
        }
        TokenReservation reservation = new TokenReservation(caller, promptEstimate, reserved, budgets, metrics,
                exchange);
        exchange.getAttributes().put(GatewayAttributes.RESERVATION, reservation);
        return chain.filter(exchange).doFinally(signal -> reservation.settleAtEnd(signal == SignalType.CANCEL));
    }

    /** Prompt tokens estimated from the body's size: {@code budget.prompt-bytes-per-token} bytes per token. */
    long promptEstimate(long bodyBytes) {
        int perToken = budget.promptBytesPerToken();
        return (bodyBytes + perToken - 1) / perToken;
    }

    /** The most completion tokens the request may produce: its own cap, else the pods' default. */
    private long completionCap(ServerWebExchange exchange) {
        Long requested = exchange.getAttribute(GatewayAttributes.MAX_COMPLETION_TOKENS);
        return requested != null ? requested : budget.defaultMaxTokens();
    }
}
