package io.modelservice.gateway.web;

import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicBoolean;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.modelservice.gateway.auth.AuthenticationException;
import io.modelservice.gateway.auth.Authenticator;
import io.modelservice.gateway.auth.Caller;
import io.modelservice.gateway.config.GatewayProperties;
import io.modelservice.gateway.ratelimit.RateLimiter;
import io.modelservice.gateway.usage.Usage;
import io.modelservice.gateway.usage.UsageTap;
import org.reactivestreams.Publisher;
import org.springframework.core.Ordered;
import org.springframework.core.io.buffer.DataBuffer;
import org.springframework.core.io.buffer.DataBufferLimitException;
import org.springframework.core.io.buffer.DataBufferUtils;
import org.springframework.core.io.buffer.DefaultDataBufferFactory;
import org.springframework.http.HttpHeaders;
import org.springframework.http.MediaType;
import org.springframework.http.server.reactive.ServerHttpRequest;
import org.springframework.http.server.reactive.ServerHttpRequestDecorator;
import org.springframework.http.server.reactive.ServerHttpResponse;
import org.springframework.http.server.reactive.ServerHttpResponseDecorator;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import reactor.core.publisher.Flux;
import reactor.core.publisher.Mono;

/**
 * The edge of {@code /v1/**}, before routing: authenticate the caller, apply its request and token budgets, check
 * the body (size, a JSON object, an allowed model), ask upstream for stream usage, swap the caller's credential
 * for the internal one, and debit the tokens of the answer as it passes.
 */
@Component
public class EdgeFilter implements WebFilter, Ordered {

    public static final int ORDER = Ordered.HIGHEST_PRECEDENCE + 100;
    public static final String INTERNAL_PREFIX = "/__gateway/";

    private static final ObjectMapper JSON = new ObjectMapper();

    private final GatewayProperties properties;
    private final Authenticator authenticator;
    private final RateLimiter rateLimiter;
    private final GatewayMetrics metrics;

    public EdgeFilter(GatewayProperties properties, Authenticator authenticator, RateLimiter rateLimiter,
                      GatewayMetrics metrics) {
        this.properties = properties;
        this.authenticator = authenticator;
        this.rateLimiter = rateLimiter;
        this.metrics = metrics;
    }

    @Override
    public int getOrder() {
        return ORDER;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
        String path = exchange.getRequest().getPath().pathWithinApplication().value();
        if (path.startsWith(INTERNAL_PREFIX)) {
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

        RateLimiter.Decision decision = rateLimiter.admit(caller);
        if (!decision.allowed()) {
            metrics.rateLimited(caller, decision.limit());
            String message = "Rate limit reached for " + caller.name() + " on " + decision.limit() + " per minute ("
                    + (decision.limit().equals("tokens") ? caller.tokensPerMinute() : caller.requestsPerMinute())
                    + "). Please try again in " + decision.retryAfterSeconds() + "s.";
            return reject(exchange, new OpenAiErrors.ApiError(429, message, decision.limit(), null,
                    "rate_limit_exceeded", decision.retryAfterSeconds()), "rate_limited");
        }

        if (!hasBody(exchange.getRequest())) {
            return forward(exchange, chain, caller, null, false);
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
                .flatMap(bytes -> checkAndForward(exchange, chain, caller, bytes))
                .onErrorResume(DataBufferLimitException.class,
                        e -> reject(exchange, OpenAiErrors.tooLarge(max), "too_large"));
    }

    private Mono<Void> checkAndForward(ServerWebExchange exchange, WebFilterChain chain, Caller caller, byte[] bytes) {
        JsonNode node;
        try {
            node = JSON.readTree(bytes);
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
                    bytes = JSON.writeValueAsBytes(body);
                } catch (Exception e) {
                    return Mono.error(e);
                }
            }
        }
        exchange.getAttributes().put(GatewayAttributes.STREAM, stream);
        exchange.getAttributes().put(GatewayAttributes.BODY, bytes);
        return forward(exchange, chain, caller, bytes, injectedUsage);
    }

    private Mono<Void> forward(ServerWebExchange exchange, WebFilterChain chain, Caller caller, byte[] body,
                               boolean injectedUsage) {
        ServerHttpRequest request = withBody(exchange.getRequest().mutate().headers(headers -> {
            headers.remove(HttpHeaders.AUTHORIZATION);
            headers.remove(properties.getCallerHeader());
            if (!properties.getInternalApiKey().isBlank()) {
                headers.setBearerAuth(properties.getInternalApiKey());
            }
            headers.set(properties.getCallerHeader(), caller.name());
            if (body != null) {
                headers.remove(HttpHeaders.TRANSFER_ENCODING);
                headers.setContentLength(body.length);
            }
        }).build(), body);
        ServerWebExchange mutated = exchange.mutate()
                .request(request)
                .response(new UsageDebitingResponse(exchange, caller, injectedUsage))
                .build();
        return chain.filter(mutated);
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

    /** Passes the answer through, reading its usage, and debits the caller's token budget when it ends. */
    private final class UsageDebitingResponse extends ServerHttpResponseDecorator {
        private final ServerWebExchange exchange;
        private final Caller caller;
        private final boolean injectedUsage;
        private final AtomicBoolean debited = new AtomicBoolean();

        UsageDebitingResponse(ServerWebExchange exchange, Caller caller, boolean injectedUsage) {
            super(exchange.getResponse());
            this.exchange = exchange;
            this.caller = caller;
            this.injectedUsage = injectedUsage;
        }

        private boolean tapped() {
            // Only successful model answers carry usage; errors (ours or upstream's) pass as they are.
            var status = getStatusCode();
            MediaType type = getHeaders().getContentType();
            return status != null && status.is2xxSuccessful() && type != null
                    && (MediaType.TEXT_EVENT_STREAM.isCompatibleWith(type)
                        || MediaType.APPLICATION_JSON.isCompatibleWith(type));
        }

        private boolean isSse() {
            MediaType type = getHeaders().getContentType();
            return type != null && MediaType.TEXT_EVENT_STREAM.isCompatibleWith(type);
        }

        @Override
        public Mono<Void> writeWith(Publisher<? extends DataBuffer> body) {
            if (!tapped()) {
                return super.writeWith(body);
            }
            return super.writeWith(tap(Flux.from(body)));
        }

        @Override
        public Mono<Void> writeAndFlushWith(Publisher<? extends Publisher<? extends DataBuffer>> body) {
            if (!tapped()) {
                return super.writeAndFlushWith(body);
            }
            Flux<DataBuffer> flat = Flux.from(body).concatMap(Flux::from);
            return super.writeAndFlushWith(tap(flat).map(Flux::just));
        }

        private Flux<DataBuffer> tap(Flux<? extends DataBuffer> body) {
            boolean sse = isSse();
            UsageTap tap = new UsageTap(sse, sse && injectedUsage);
            ServerHttpResponse delegate = getDelegate();
            Flux<DataBuffer> source = Flux.from(body).map(b -> (DataBuffer) b);
            if (sse) {
                source = source.timeout(properties.getStreamIdleTimeout())
                        .onErrorResume(TimeoutException.class, e -> Flux.just(delegate.bufferFactory().wrap((
                                "data: " + new String(OpenAiErrors.ApiError.of(504, "The model stopped sending for "
                                        + properties.getStreamIdleTimeout().toSeconds() + "s.", "timeout_error",
                                        "stream_idle_timeout").body(), StandardCharsets.UTF_8)
                                        + "\n\n").getBytes(StandardCharsets.UTF_8))));
            }
            // Debit as soon as the real usage is known, before the bytes that follow it (a stream's [DONE], a held
            // JSON answer) go out: a client that sends its next request the moment this answer ends must already
            // see its budget spent. doFinally covers answers cut short or without usage (an estimate).
            return source
                    .concatMapIterable(buffer -> debitIfReported(tap, tap.onBuffer(buffer, delegate.bufferFactory())))
                    .concatWith(Flux.defer(() -> Flux.fromIterable(
                            debitIfReported(tap, tap.onComplete(delegate.bufferFactory())))))
                    .doFinally(signal -> debit(tap.usage()));
        }

        private List<DataBuffer> debitIfReported(UsageTap tap, List<DataBuffer> out) {
            if (tap.usageReported()) {
                debit(tap.usage());
            }
            return out;
        }

        private void debit(Usage usage) {
            if (!debited.compareAndSet(false, true)) {
                return;
            }
            exchange.getAttributes().put(GatewayAttributes.USAGE, usage);
            rateLimiter.debitTokens(caller, usage.totalTokens());
            metrics.tokens(caller, (String) exchange.getAttributes().get(GatewayAttributes.MODEL), usage);
        }
    }
}
