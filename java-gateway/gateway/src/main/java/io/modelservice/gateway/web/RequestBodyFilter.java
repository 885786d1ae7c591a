package io.modelservice.gateway.web;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.modelservice.gateway.auth.Caller;
import io.modelservice.gateway.config.GatewayProperties;
import io.netty.handler.timeout.ReadTimeoutException;
import org.springframework.core.Ordered;
import org.springframework.core.io.buffer.DataBufferLimitException;
import org.springframework.core.io.buffer.DataBufferUtils;
import org.springframework.http.HttpHeaders;
import org.springframework.http.server.reactive.ServerHttpRequest;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import reactor.core.publisher.Mono;

/**
 * Reads and checks the body of an authenticated request before it is routed: at most {@code max-body-size} (413),
 * JSON (400 {@code invalid_json}), an object (400 {@code invalid_body}), a {@code model} the caller may use (403).
 * For {@code "stream": true} it sets {@code stream_options.include_usage} so the model service reports the real
 * token count in a last chunk ({@link UsageDebitFilter} removes that chunk again when the client had not asked for
 * it). The body is then held in memory ({@link ReplayableBody}) so retries can send it again.
 * <p>
 * Sets {@link GatewayAttributes#MODEL}, {@link GatewayAttributes#STREAM}, {@link GatewayAttributes#BODY} (as
 * forwarded), {@link GatewayAttributes#BODY_SIZE} (as received), {@link GatewayAttributes#MAX_COMPLETION_TOKENS} and
 * {@link GatewayAttributes#STREAM_USAGE_INJECTED}.
 */
@Component
public class RequestBodyFilter implements WebFilter, Ordered {

    private final GatewayProperties properties;
    private final OpenAiErrors errors;
    private final GatewayMetrics metrics;
    private final ObjectMapper json;

    public RequestBodyFilter(GatewayProperties properties, OpenAiErrors errors, GatewayMetrics metrics,
                             ObjectMapper json) {
        this.properties = properties;
        this.errors = errors;
        this.metrics = metrics;
        this.json = json;
    }

    @Override
    public int getOrder() {
        return EdgeOrder.REQUEST_BODY;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
        Caller caller = exchange.getAttribute(GatewayAttributes.CALLER);
        if (caller == null || !hasBody(exchange.getRequest())) {
            return chain.filter(exchange);
        }
        long max = properties.maxBodySize().toBytes();
        long declared = exchange.getRequest().getHeaders().getContentLength();
        if (declared > max) {
            return errors.reject(exchange, OpenAiErrors.tooLarge(max), "too_large");
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
                        ? errors.write(exchange, OpenAiErrors.badRequest("The request body is malformed.",
                                "malformed_request")).doOnSubscribe(s -> metrics.rejected("malformed_request"))
                        : checkAndForward(exchange, chain, caller, bytes))
                .onErrorResume(DataBufferLimitException.class,
                        e -> errors.reject(exchange, OpenAiErrors.tooLarge(max), "too_large"))
                // llm-gateway.edge.read-timeout / request-timeout: a client that stopped sending its body
                .onErrorResume(e -> OpenAiErrorHandler.rootCause(e) instanceof ReadTimeoutException,
                        e -> errors.reject(exchange, OpenAiErrors.ApiError.of(408,
                                "The request body did not arrive in time.", "invalid_request_error",
                                "request_timeout"), "request_timeout"));
    }

    private Mono<Void> checkAndForward(ServerWebExchange exchange, WebFilterChain chain, Caller caller, byte[] bytes) {
        JsonNode node;
        try {
            node = json.readTree(bytes);
        } catch (Exception e) {
            return errors.reject(exchange, OpenAiErrors.badRequest("The request body is not valid JSON.",
                    "invalid_json"), "invalid_json");
        }
        if (node == null || !node.isObject()) {
            return errors.reject(exchange, OpenAiErrors.badRequest("The request body must be a JSON object.",
                    "invalid_body"), "invalid_body");
        }
        ObjectNode body = (ObjectNode) node;
        JsonNode modelNode = body.get("model");
        String model = modelNode != null && modelNode.isTextual() ? modelNode.asText() : null;
        if (model != null) {
            exchange.getAttributes().put(GatewayAttributes.MODEL, model);
        }
        if (!caller.mayUse(model)) {
            return errors.reject(exchange, new OpenAiErrors.ApiError(403, "The caller " + caller.name()
                    + " may not use the model '" + model + "'.", "invalid_request_error", "model",
                    "model_not_allowed", 0), "model_not_allowed");
        }
        exchange.getAttributes().put(GatewayAttributes.BODY_SIZE, bytes.length);
        Long maxCompletionTokens = maxCompletionTokens(body);
        if (maxCompletionTokens != null) {
            exchange.getAttributes().put(GatewayAttributes.MAX_COMPLETION_TOKENS, maxCompletionTokens);
        }
        boolean stream = body.path("stream").asBoolean(false);
        boolean injectedUsage = stream && askForStreamUsage(body);
        if (injectedUsage) {
            try {
                bytes = json.writeValueAsBytes(body);
            } catch (Exception e) {
                return Mono.error(e);
            }
        }
        exchange.getAttributes().put(GatewayAttributes.STREAM, stream);
        exchange.getAttributes().put(GatewayAttributes.STREAM_USAGE_INJECTED, injectedUsage);
        exchange.getAttributes().put(GatewayAttributes.BODY, bytes);
        byte[] forwarded = bytes;
        ServerHttpRequest request = ReplayableBody.of(exchange.getRequest().mutate().headers(headers -> {
            headers.remove(HttpHeaders.TRANSFER_ENCODING);
            headers.setContentLength(forwarded.length);
        }).build(), forwarded);
        return chain.filter(exchange.mutate().request(request).build());
    }

    /** Sets {@code stream_options.include_usage}; returns whether the body changed (the client had not asked). */
    private static boolean askForStreamUsage(ObjectNode body) {
        JsonNode options = body.get("stream_options");
        if (options == null || options.isNull()) {
            body.putObject("stream_options").put("include_usage", true);
            return true;
        }
        if (options.isObject() && !options.path("include_usage").asBoolean(false)) {
            ((ObjectNode) options).put("include_usage", true);
            return true;
        }
        return false;
    }

    /** The request's own completion cap: {@code max_completion_tokens}, else {@code max_tokens}; null if none. */
    private static Long maxCompletionTokens(ObjectNode body) {
        for (String field : new String[] {"max_completion_tokens", "max_tokens"}) {
            JsonNode value = body.get(field);
            if (value != null && value.canConvertToLong() && value.asLong() >= 0) {
                return value.asLong();
            }
        }
        return null;
    }

    private static boolean hasBody(ServerHttpRequest request) {
        HttpHeaders headers = request.getHeaders();
        return headers.getContentLength() > 0 || headers.containsKey(HttpHeaders.TRANSFER_ENCODING);
    }
}
