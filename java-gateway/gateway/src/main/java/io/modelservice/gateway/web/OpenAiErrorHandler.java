package io.modelservice.gateway.web;

import java.net.ConnectException;
import java.util.concurrent.TimeoutException;

import io.github.resilience4j.circuitbreaker.CallNotPermittedException;
import io.modelservice.gateway.ratelimit.BudgetStoreUnavailableException;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.boot.web.reactive.error.ErrorWebExceptionHandler;
import org.springframework.core.annotation.Order;
import org.springframework.core.io.buffer.DataBufferLimitException;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ResponseStatusException;
import org.springframework.web.server.ServerWebExchange;
import reactor.core.publisher.Mono;

/**
 * Every error the gateway raises itself (no route, no instance, upstream down, timeouts) answered in OpenAI's
 * error shape instead of Spring's. Runs before Boot's default handler.
 */
@Component
@Order(-2)
public class OpenAiErrorHandler implements ErrorWebExceptionHandler {

    private static final Logger log = LoggerFactory.getLogger(OpenAiErrorHandler.class);

    private final OpenAiErrors errors;

    public OpenAiErrorHandler(OpenAiErrors errors) {
        this.errors = errors;
    }

    @Override
    public Mono<Void> handle(ServerWebExchange exchange, Throwable ex) {
        if (exchange.getResponse().isCommitted()) {
            return Mono.error(ex);
        }
        return errors.write(exchange, toApiError(exchange, ex));
    }

    /** The OpenAI-shaped answer for an exception (also used by the circuit breaker fallback). */
    public static OpenAiErrors.ApiError toApiError(ServerWebExchange exchange, Throwable ex) {
        Throwable root = rootCause(ex);
        if (ex instanceof CallNotPermittedException || root instanceof CallNotPermittedException) {
            return OpenAiErrors.unavailable("The model service is unavailable (circuit open). Please retry later.", 10);
        }
        if (root instanceof BudgetStoreUnavailableException) {
            // llm-gateway.budgets.when-redis-down=fail-closed while Redis is unreachable
            return OpenAiErrors.ApiError.of(503, root.getMessage(), "server_error", "budget_store_unavailable")
                    .retryAfter(BudgetStoreUnavailableException.RETRY_AFTER_SECONDS);
        }
        if (root instanceof DataBufferLimitException) {
            return OpenAiErrors.ApiError.of(413, "The request body is too large.", "invalid_request_error",
                    "request_too_large");
        }
        if (ex instanceof ResponseStatusException rse) {
            int status = rse.getStatusCode().value();
            if (status == 404) {
                return OpenAiErrors.notFound(exchange.getRequest().getPath().value());
            }
            if (status == 503) {
                // Spring Cloud Gateway's NotFoundException: no healthy instance of the service
                return OpenAiErrors.unavailable("No healthy model-service instance is available. Please retry later.",
                        5);
            }
            if (status == 504 || root instanceof TimeoutException) {
                return OpenAiErrors.ApiError.of(504, "The model service did not answer in time.", "timeout_error",
                        "upstream_timeout");
            }
            if (status == 405) {
                return OpenAiErrors.ApiError.of(405, "Method not allowed.", "invalid_request_error",
                        "method_not_allowed");
            }
            if (status == 413) {
                return OpenAiErrors.ApiError.of(413, "The request body is too large.", "invalid_request_error",
                        "request_too_large");
            }
            if (status < 500) {
                return OpenAiErrors.badRequest(rse.getReason() == null ? "Bad request." : rse.getReason(),
                        "invalid_request");
            }
        }
        if (root instanceof TimeoutException) {
            return OpenAiErrors.ApiError.of(504, "The model service did not answer in time.", "timeout_error",
                    "upstream_timeout");
        }
        if (root instanceof ConnectException || root instanceof java.io.IOException) {
            return OpenAiErrors.ApiError.of(502, "The model service could not be reached.", "server_error",
                    "bad_gateway").retryAfter(2);
        }
        log.warn("unexpected gateway error: {}", ex.toString());
        return OpenAiErrors.ApiError.of(500, "Internal gateway error.", "server_error", "internal_error");
    }

    static Throwable rootCause(Throwable t) {
        Throwable cur = t;
        for (int i = 0; i < 16 && cur.getCause() != null && cur.getCause() != cur; i++) {
            cur = cur.getCause();
        }
        return cur;
    }
}
