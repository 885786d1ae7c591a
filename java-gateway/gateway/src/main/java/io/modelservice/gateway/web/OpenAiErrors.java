package io.modelservice.gateway.web;

import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.Map;

import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.databind.ObjectMapper;
import org.springframework.core.io.buffer.DataBuffer;
import org.springframework.http.HttpStatusCode;
import org.springframework.http.MediaType;
import org.springframework.http.server.reactive.ServerHttpResponse;
import org.springframework.http.server.reactive.ServerHttpResponseDecorator;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import reactor.core.publisher.Mono;

/**
 * Errors in OpenAI's shape: {@code {"error": {"message", "type", "param", "code"}}}. The static factories name the
 * errors; the bean writes them (with the application's {@link ObjectMapper}) and counts the edge's refusals.
 */
@Component
public final class OpenAiErrors {

    private final ObjectMapper json;
    private final GatewayMetrics metrics;

    public OpenAiErrors(ObjectMapper json, GatewayMetrics metrics) {
        this.json = json;
        this.metrics = metrics;
    }

    /** One error answer: status, the body fields, and an optional Retry-After (seconds, 0 = none). */
    public record ApiError(int status, String message, String type, String param, String code, long retryAfterSeconds) {

        public static ApiError of(int status, String message, String type, String code) {
            return new ApiError(status, message, type, null, code, 0);
        }

        public ApiError retryAfter(long seconds) {
            return new ApiError(status, message, type, param, code, seconds);
        }
    }

    public static ApiError unauthorized(String message) {
        return ApiError.of(401, message, "invalid_request_error", "invalid_api_key");
    }

    public static ApiError notFound(String path) {
        return ApiError.of(404, "Unknown request URL: " + path + ".", "invalid_request_error", "unknown_url");
    }

    public static ApiError tooLarge(long maxBytes) {
        return ApiError.of(413, "The request body exceeds " + maxBytes + " bytes.", "invalid_request_error",
                "request_too_large");
    }

    public static ApiError badRequest(String message, String code) {
        return ApiError.of(400, message, "invalid_request_error", code);
    }

    public static ApiError unavailable(String message, long retryAfter) {
        return ApiError.of(503, message, "server_error", "service_unavailable").retryAfter(retryAfter);
    }

    /** Whether the HTTP server already sent this request's response head itself, outside the application (Reactor
     *  Netty does for a request it could not decode). */
    public static boolean answeredByServer(ServerWebExchange exchange) {
        Object nativeResponse;
        try {
            nativeResponse = ServerHttpResponseDecorator.getNativeResponse(exchange.getResponse());
        } catch (IllegalArgumentException | IllegalStateException notNetty) {  // not Reactor Netty (a mock)
            return false;
        }
        return nativeResponse instanceof reactor.netty.http.server.HttpServerResponse r && r.hasSentHeaders()
                && !exchange.getResponse().isCommitted();
    }

    /** The error's JSON body. */
    public byte[] body(ApiError error) {
        Map<String, Object> fields = new LinkedHashMap<>();
        fields.put("message", error.message());
        fields.put("type", error.type());
        fields.put("param", error.param());
        fields.put("code", error.code());
        try {
            return json.writeValueAsBytes(Map.of("error", fields));
        } catch (JsonProcessingException e) {
            return ("{\"error\":{\"message\":\"internal error\",\"type\":\"server_error\",\"param\":null,"
                    + "\"code\":\"internal_error\"}}").getBytes(StandardCharsets.UTF_8);
        }
    }

    /** Refuses the request at the edge: counts it ({@code llm_gateway_rejected_total{reason}}) and writes the error. */
    public Mono<Void> reject(ServerWebExchange exchange, ApiError error, String reason) {
        metrics.rejected(reason);
        return write(exchange, error);
    }

    /** Writes the error as the whole response (if nothing was sent yet). */
    public Mono<Void> write(ServerWebExchange exchange, ApiError error) {
        ServerHttpResponse response = exchange.getResponse();
        if (response.isCommitted()) {
            return Mono.empty();
        }
        exchange.getAttributes().put(GatewayAttributes.ERROR_CODE, error.code());
        if (answeredByServer(exchange)) {
            // The server answered this request itself (Reactor Netty: 400 for a body it could not decode) and
            // closes the connection; writing again would fail as a 500. Log the error the client got.
            exchange.getAttributes().put(GatewayAttributes.ANSWERED_STATUS, error.status());
            return Mono.empty();
        }
        response.setStatusCode(HttpStatusCode.valueOf(error.status()));
        response.getHeaders().setContentType(MediaType.APPLICATION_JSON);
        if (error.status() == 401) {
            response.getHeaders().set("WWW-Authenticate", "Bearer");
        }
        if (error.retryAfterSeconds() > 0) {
            response.getHeaders().set("Retry-After", Long.toString(error.retryAfterSeconds()));
        }
        byte[] body = body(error);
        response.getHeaders().setContentLength(body.length);
        DataBuffer buffer = response.bufferFactory().wrap(body);
        return response.writeWith(Mono.just(buffer));
    }
}
