package io.modelservice.gateway.web;

import java.util.concurrent.atomic.AtomicBoolean;

import io.modelservice.gateway.auth.Caller;
import io.modelservice.gateway.ratelimit.CallerBudgets;
import io.modelservice.gateway.usage.Usage;
import io.modelservice.gateway.usage.UsageTap;
import org.springframework.http.HttpStatusCode;
import org.springframework.web.server.ServerWebExchange;

/**
 * The tokens one admitted request holds in its caller's budget, from admission until it is settled, once:
 * <ul>
 *   <li>with the upstream's own usage, as soon as the tap sees it (before the end of the answer reaches the
 *   client, so the caller's next request already sees it);</li>
 *   <li>else, when the exchange ends: a model answer without usage (the client left mid-stream, the stream broke)
 *   costs the prompt estimate plus one token per content chunk seen; a client that left before any answer costs
 *   the prompt estimate (the pod may have read the prompt); an error answer costs nothing.</li>
 * </ul>
 */
public final class TokenReservation {

    private final Caller caller;
    private final long promptEstimate;
    private final long reserved;
    private final CallerBudgets budgets;
    private final GatewayMetrics metrics;
    private final ServerWebExchange exchange;
    private final AtomicBoolean settled = new AtomicBoolean();
    private volatile UsageTap tap;

    TokenReservation(Caller caller, long promptEstimate, long reserved, CallerBudgets budgets, GatewayMetrics metrics,
                     ServerWebExchange exchange) {
        this.caller = caller;
        this.promptEstimate = promptEstimate;
        this.reserved = reserved;
        this.budgets = budgets;
        this.metrics = metrics;
        this.exchange = exchange;
    }

    /** The tap reading the model's answer (set when a successful answer starts). */
    void attach(UsageTap tap) {
        this.tap = tap;
    }

    /** Settles now if the tap has seen the upstream's usage. */
    void settleIfReported() {
        UsageTap t = tap;
        if (t != null && t.usageReported()) {
            settle(t.usage());
        }
    }

    /** Settles at the end of the exchange (or of the answer body), from what is known; a no-op once settled. */
    void settleAtEnd(boolean clientLeft) {
        if (settled.get()) {
            return;
        }
        UsageTap t = tap;
        if (t != null) {
            Usage seen = t.usage();
            settle(seen.reported() ? seen : new Usage(promptEstimate, seen.completionTokens(),
                    promptEstimate + seen.completionTokens(), false));
            return;
        }
        HttpStatusCode status = exchange.getResponse().getStatusCode();
        boolean answered = status != null && status.is2xxSuccessful();
        settle(clientLeft || answered ? new Usage(promptEstimate, 0, promptEstimate, false) : Usage.NONE);
    }

    private void settle(Usage usage) {
        if (!settled.compareAndSet(false, true)) {
            return;
        }
        budgets.settle(caller, reserved, usage.totalTokens());
        if (usage.totalTokens() > 0) {
            exchange.getAttributes().put(GatewayAttributes.USAGE, usage);
            metrics.tokens(caller, exchange.getAttribute(GatewayAttributes.MODEL), usage);
        }
    }
}
