package io.modelservice.gateway.web;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.modelservice.gateway.auth.AuthenticationException;
import io.modelservice.gateway.auth.Authenticator;
import io.modelservice.gateway.auth.Caller;
import io.modelservice.gateway.config.GatewayProperties;
import io.modelservice.gateway.ratelimit.CallerBudgets;
import org.springframework.core.Ordered;
import org.springframework.core.io.buffer.DataBuffer;
import org.springframework.core.io.buffer.DataBufferLimitException;
import org.springframework.core.io.buffer.DataBufferUtils;
import org.springframework.core.io.buffer.DefaultDataBufferFactory;
import org.springframework.http.HttpHeaders;
import org.springframework.http.server.reactive.ServerHttpRequest;
import org.springframework.http.server.reactive.ServerHttpRequestDecorator;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import io.netty.handler.timeout.ReadTimeoutException;
import reactor.core.publisher.Flux;
import reactor.core.publisher.Mono;
import reactor.core.publisher.SignalType;

/**
 * The edge of {@code /v1/**}, before routing: authenticate the caller, check the body (size, a JSON object, an
 * allowed model), ask upstream for stream usage, admit the request against the caller's budgets with a token
 * reservation, and settle that reservation with the tokens of the answer as it passes. Runs after
 * {@link CanonicalPathFilter}, so the path it looks at is the path the routes match. The upstream credentials are
 * set as the request leaves ({@code route.UpstreamHeaders}), never here.
 */
@Component
public class EdgeFilter implements WebFilter, Ordered {

    public static final int ORDER = Ordered.HIGHEST_PRECEDENCE + 100;
    public static final String INTERNAL_PREFIX = "/__gateway/";

    private final GatewayProperties properties;
    private final Authenticator authenticator;
    private final CallerBudgets budgets;
    private final GatewayMetrics metrics;
    private final ObjectMapper json;

    public EdgeFilter(GatewayProperties properties, Authenticator authenticator, CallerBudgets budgets,
                      GatewayMetrics metrics, ObjectMapper json) {
        this.properties = properties;
        this.authenticator = authenticator;
        this.budgets = budgets;
        this.metrics = metrics;
        this.json = json;
    }

    @Override
    public int getOrder() {
        return ORDER;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
        String path = exchange.getRequest().getPath().pathWithinApplication().value();
        if (path.startsWith(INTERNAL_PREFIX) || path.equals(INTERNAL_PREFIX.substring(0, INTERNAL_PREFIX.length() - 1))) {
            return reject(exchange, OpenAiErrors.notFound(path), "unknown_url");
        }
        if (!path.equals("/v1") && !path.startsWith("/v1/")) {
            return chain.filter(exchange);
        }
        exchange.getAttributes().put(GatewayAttributes.ORIGINAL_PATH, path);

        Caller caller;
        try {
            caller = authenticator.authenticate(exchange.getRequest().getHeaders().getFirst(HttpHeaders.AUTHORIZATION));
        } catch (AuthenticationException e) {
            return reject(exchange, OpenAiErrors.unauthorized(e.getMessage()), "unauthenticated");
        }
        exchange.getAttributes().put(GatewayAttributes.CALLER, caller);

        if (!hasBody(exchange.getRequest())) {
            return admitAndForward(exchange, chain, caller, null, 0, 0, false);
        }
        long max = properties.getMaxBodySize().toBytes();
        long declared = exchange.getRequest().getHeaders().getContentLength();
        if (declared > max) {
            return reject(exchange, OpenAiErrors.tooLarge(max), "too_large");
        }
        return DataBufferUtils.join(exchange.getRequest().getBody(), (int) Math.min(max, Integer.MAX_VALUE))
                .map(buffer -> {
                    byte[] bytes = new byte[buffer.readableByteCount()];
                    buffer.read(bytes);
                    DataBufferUtils.release(buffer);
                    return bytes;
                })
                .defaultIfEmpty(new byte[0])
                .flatMap(bytes -> OpenAiErrors.answeredByServer(exchange)
                        // Reactor Netty could not decode the body (a broken chunked encoding) and has already
                        // answered 400 and closed: record that, add nothing.
                        ? OpenAiErrors.write(exchange, OpenAiErrors.badRequest("The request body is malformed.",
                                "malformed_request")).doOnSubscribe(s -> metrics.rejected("malformed_request"))
                        : checkAndForward(exchange, chain, caller, bytes))
                .onErrorResume(DataBufferLimitException.class,
                        e -> reject(exchange, OpenAiErrors.tooLarge(max), "too_large"))
                // llm-gateway.edge.read-timeout / request-timeout: a client that stopped sending its body
                .onErrorResume(e -> OpenAiErrorHandler.rootCause(e) instanceof ReadTimeoutException,
                        e -> reject(exchange, OpenAiErrors.ApiError.of(408, "The request body did not arrive in time.",
                                "invalid_request_error", "request_timeout"), "request_timeout"));
    }

    private Mono<Void> checkAndForward(ServerWebExchange exchange, WebFilterChain chain, Caller caller, byte[] bytes) {
        JsonNode node;
        try {
            node = json.readTree(bytes);
        } catch (Exception e) {
            return reject(exchange, OpenAiErrors.badRequest("The request body is not valid JSON.", "invalid_json"),
                    "invalid_json");
        }
        if (node == null || !node.isObject()) {
            return reject(exchange, OpenAiErrors.badRequest("The request body must be a JSON object.", "invalid_body"),
                    "invalid_body");
        }
        ObjectNode body = (ObjectNode) node;
        JsonNode modelNode = body.get("model");
        String model = modelNode != null && modelNode.isTextual() ? modelNode.asText() : null;
        if (model != null) {
            exchange.getAttributes().put(GatewayAttributes.MODEL, model);
        }
        if (!caller.mayUse(model)) {
            return reject(exchange, new OpenAiErrors.ApiError(403, "The caller " + caller.name()
                    + " may not use the model '" + model + "'.", "invalid_request_error", "model",
                    "model_not_allowed", 0), "model_not_allowed");
        }
        long promptEstimate = promptEstimate(bytes.length);
        long reserved = promptEstimate + completionCap(body);
        boolean stream = body.path("stream").asBoolean(false);
        boolean injectedUsage = false;
        if (stream) {
            JsonNode options = body.get("stream_options");
            if (options == null || options.isNull()) {
                body.putObject("stream_options").put("include_usage", true);
                injectedUsage = true;
            } else if (options.isObject() && !options.path("include_usage").asBoolean(false)) {
                ((ObjectNode) options).put("include_usage", true);
                injectedUsage = true;
            }
            if (injectedUsage) {
                try {
                    bytes = json.writeValueAsBytes(body);
                } catch (Exception e) {
                    return Mono.error(e);
                }
            }
        }
        exchange.getAttributes().put(GatewayAttributes.STREAM, stream);
        exchange.getAttributes().put(GatewayAttributes.BODY, bytes);
        return admitAndForward(exchange, chain, caller, bytes, promptEstimate, reserved, injectedUsage);
    }

    /** Prompt tokens estimated from the body's size: {@code budget.prompt-bytes-per-token} bytes per token. */
    long promptEstimate(long bodyBytes) {
        int perToken = properties.getBudget().getPromptBytesPerToken();
        return (bodyBytes + perToken - 1) / perToken;
    }

    /** The most completion tokens the request may produce: its max_completion_tokens / max_tokens, else the pods'
     *  default ({@code budget.default-max-tokens}). */
    long completionCap(ObjectNode body) {
        for (String field : new String[] {"max_completion_tokens", "max_tokens"}) {
            JsonNode value = body.get(field);
            if (value != null && value.canConvertToLong() && value.asLong() >= 0) {
                return value.asLong();
            }
        }
        return properties.getBudget().getDefaultMaxTokens();
    }

    private Mono<Void> admitAndForward(ServerWebExchange exchange, WebFilterChain chain, Caller caller, byte[] body,
                                       long promptEstimate, long reserved, boolean injectedUsage) {
        return budgets.admitAsync(caller, reserved).flatMap(decision -> forwardIfAdmitted(exchange, chain, caller,
                body, promptEstimate, reserved, injectedUsage, decision));
    }

    private Mono<Void> forwardIfAdmitted(ServerWebExchange exchange, WebFilterChain chain, Caller caller, byte[] body,
                                         long promptEstimate, long reserved, boolean injectedUsage,
                                         CallerBudgets.Decision decision) {
        if (!decision.allowed()) {
            metrics.rateLimited(caller, decision.limit());
            String message = "Rate limit reached for " + caller.name() + " on " + decision.limit() + " per minute ("
                    + (decision.limit().equals("tokens") ? caller.tokensPerMinute() : caller.requestsPerMinute())
                    + "). Please try again in " + decision.retryAfterSeconds() + "s.";
            return reject(exchange, new OpenAiErrors.ApiError(429, message, decision.limit(), null,
                    "rate_limit_exceeded", decision.retryAfterSeconds()), "rate_limited");
        }
        TokenReservation reservation = new TokenReservation(caller, promptEstimate, reserved, budgets, metrics,
                exchange);
        ServerHttpRequest request = withBody(exchange.getRequest().mutate().headers(headers -> {
            if (body != null) {
                headers.remove(HttpHeaders.TRANSFER_ENCODING);
                headers.setContentLength(body.length);
            }
        }).build(), body);
        ServerWebExchange mutated = exchange.mutate()
                .request(request)
                .response(new UsageSettlingResponse(exchange.getResponse(), reservation, injectedUsage,
                        properties.getStreamIdleTimeout()))
                .build();
        return chain.filter(mutated).doFinally(signal -> reservation.settleAtEnd(signal == SignalType.CANCEL));
    }

    /** A request whose body is the given bytes, replayable: every subscription gets a fresh buffer (retries). */
    public static ServerHttpRequest withBody(ServerHttpRequest request, byte[] body) {
        if (body == null) {
            return request;
        }
        return new ServerHttpRequestDecorator(request) {
            @Override
            public Flux<DataBuffer> getBody() {
                return Flux.defer(() -> Flux.just(DefaultDataBufferFactory.sharedInstance.wrap(body)));
            }
        };
    }

    private static boolean hasBody(ServerHttpRequest request) {
        HttpHeaders headers = request.getHeaders();
        return headers.getContentLength() > 0 || headers.containsKey(HttpHeaders.TRANSFER_ENCODING);
    }

    private Mono<Void> reject(ServerWebExchange exchange, OpenAiErrors.ApiError error, String reason) {
        metrics.rejected(reason);
        return OpenAiErrors.write(exchange, error);
    }
}
