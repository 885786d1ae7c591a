package io.modelservice.gateway.web;

import org.springframework.core.Ordered;

/**
 * The order of the edge's web filters, which run before routing, outermost first. Each one does one job and hands
 * what it learnt to the next through exchange attributes ({@link GatewayAttributes}).
 */
public final class EdgeOrder {

    /** {@link AccessLogFilter}: one line per API request, when its answer has ended. */
    public static final int ACCESS_LOG = Ordered.HIGHEST_PRECEDENCE;
    /** {@code route.InFlightAttempts.ExchangeEnd}: ends the exchange's attempts on pods (load-aware routing) once its
     *  answer has ended. */
    public static final int ATTEMPTS_END = Ordered.HIGHEST_PRECEDENCE + 10;
    /** {@link CanonicalPathFilter}: 400 for a path that is not in its normal form. */
    public static final int CANONICAL_PATH = Ordered.HIGHEST_PRECEDENCE + 50;
    /** {@link InternalPathFilter}: 404 for the internal {@code /__gateway/**} paths. */
    public static final int INTERNAL_PATH = Ordered.HIGHEST_PRECEDENCE + 100;
    /** {@link CallerAuthenticationFilter}: who is calling {@code /v1/**} (401 otherwise). */
    public static final int AUTHENTICATION = Ordered.HIGHEST_PRECEDENCE + 110;
    /** {@link RequestBodyFilter}: body size, JSON, allowed model; asks a stream for its usage. */
    public static final int REQUEST_BODY = Ordered.HIGHEST_PRECEDENCE + 120;
    /** {@link BudgetAdmissionFilter}: admits against the caller's budgets with a token reservation (429 otherwise). */
    public static final int BUDGET_ADMISSION = Ordered.HIGHEST_PRECEDENCE + 130;
    /** {@link UsageDebitFilter}: settles the reservation with the answer's usage as the answer passes. */
    public static final int USAGE_DEBIT = Ordered.HIGHEST_PRECEDENCE + 140;

    private EdgeOrder() {
    }
}
