package io.modelservice.gateway.web;

import org.springframework.cloud.gateway.support.ServerWebExchangeUtils;
import org.springframework.web.bind.annotation.PathVariable;
import org.springframework.web.bind.annotation.RequestMapping;
import org.springframework.web.bind.annotation.RestController;
import org.springframework.web.server.ServerWebExchange;
import reactor.core.publisher.Mono;

/**
 * Where a route's circuit breaker sends a request its model service could not take (all instances down or
 * failing, circuit open, timeouts): an OpenAI-shaped error with Retry-After, never a Spring error page.
 */
@RestController
public class FallbackController {

    private final OpenAiErrors errors;

    public FallbackController(OpenAiErrors errors) {
        this.errors = errors;
    }

    @RequestMapping(InternalPathFilter.INTERNAL_PREFIX + "fallback/{routeId}")
    public Mono<Void> fallback(@PathVariable String routeId, ServerWebExchange exchange) {
        Throwable cause = exchange.getAttribute(ServerWebExchangeUtils.CIRCUITBREAKER_EXECUTION_EXCEPTION_ATTR);
        OpenAiErrors.ApiError error = cause == null
                ? OpenAiErrors.unavailable("The model service is unavailable. Please retry later.", 5)
                : OpenAiErrorHandler.toApiError(exchange, cause);
        if (error.status() < 500) {
            error = OpenAiErrors.unavailable("The model service is unavailable. Please retry later.", 5);
        }
        exchange.getAttributes().put(GatewayAttributes.FALLBACK_ROUTE, routeId);
        return errors.write(exchange, error);
    }
}
