package io.modelservice.gateway.ratelimit;

/** The shared budget store cannot be reached and the gateway fails closed: the request is refused with 503. */
public class BudgetStoreUnavailableException extends RuntimeException {

    /** The Retry-After of the 503: about a few probe intervals. */
    public static final long RETRY_AFTER_SECONDS = 5;

    public BudgetStoreUnavailableException(String message) {
        super(message);
    }
}
