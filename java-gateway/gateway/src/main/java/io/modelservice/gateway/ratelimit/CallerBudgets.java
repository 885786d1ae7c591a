package io.modelservice.gateway.ratelimit;

import io.modelservice.gateway.auth.Caller;
import reactor.core.publisher.Mono;

/**
 * Per-caller budgets: requests per minute (one taken on admission) and LLM tokens per minute, charged in two steps
 * so that a burst cannot escape the budget:
 * <ol>
 *   <li>{@link #admit}: while the token budget is positive, the request is admitted and its reservation (prompt
 *   estimate + completion cap) is taken at once, atomically with the check. Parallel requests therefore see each
 *   other's reservations; only the last one admitted can overdraw the budget, by at most its own reservation.</li>
 *   <li>{@link #settle}: when the answer ends, the reservation is replaced by what was really used (the difference
 *   is returned or taken). A client that leaves is still charged its prompt.</li>
 * </ol>
 * In-memory by default ({@link InMemoryCallerBudgets}); {@link RedisCallerBudgets} keeps these semantics across
 * gateway replicas ({@code llm-gateway.budgets.store=redis}).
 */
public interface CallerBudgets {

    /** Takes one request and reserves {@code reservedTokens} if both budgets allow it; refuses otherwise. */
    Decision admit(Caller caller, long reservedTokens);

    /** {@link #admit} without blocking the caller's thread (admission runs on an event loop); a remote store
     *  overrides it. An error (the store is down and the gateway fails closed) refuses the request. */
    default Mono<Decision> admitAsync(Caller caller, long reservedTokens) {
        return Mono.fromSupplier(() -> admit(caller, reservedTokens));
    }

    /** Replaces an admitted request's reservation by the tokens it really used. */
    void settle(Caller caller, long reservedTokens, long usedTokens);

    /** The outcome of {@link #admit}: allowed, or which limit refused and for how long. */
    record Decision(boolean allowed, String limit, long retryAfterSeconds) {
        public static final Decision ALLOWED = new Decision(true, null, 0);

        public static Decision refused(String limit, long retryAfterSeconds) {
            return new Decision(false, limit, Math.max(1, retryAfterSeconds));
        }
    }
}
