package io.modelservice.gateway.ratelimit;

import io.modelservice.gateway.auth.Caller;

/**
 * Per-caller limits: requests per minute (counted on admission) and LLM tokens per minute (debited after the
 * answer with the real usage, so a caller may overdraw once; it then waits until the budget is positive again).
 * In-memory by default; a shared implementation (Redis) keeps the same contract across gateway replicas.
 */
public interface RateLimiter {

    /** Counts one request of this caller if both budgets allow it. */
    Decision admit(Caller caller);

    /** Debits tokens used by one answer. */
    void debitTokens(Caller caller, long tokens);

    /** The outcome of {@link #admit}: allowed, or which limit refused and for how long. */
    record Decision(boolean allowed, String limit, long retryAfterSeconds) {
        public static final Decision ALLOWED = new Decision(true, null, 0);

        public static Decision refused(String limit, long retryAfterSeconds) {
            return new Decision(false, limit, Math.max(1, retryAfterSeconds));
        }
    }
}
