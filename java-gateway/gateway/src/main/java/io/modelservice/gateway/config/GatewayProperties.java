package io.modelservice.gateway.config;

import java.time.Duration;
import java.util.List;

import jakarta.validation.Valid;
import jakarta.validation.constraints.NotBlank;
import jakarta.validation.constraints.NotEmpty;
import jakarta.validation.constraints.Pattern;
import jakarta.validation.constraints.Positive;
import jakarta.validation.constraints.PositiveOrZero;
import org.springframework.boot.context.properties.ConfigurationProperties;
import org.springframework.boot.context.properties.bind.DefaultValue;
import org.springframework.util.unit.DataSize;
import org.springframework.validation.annotation.Validated;

/**
 * Everything the gateway's own code reads: callers (API keys, JWT), limits, model routes, retries. Bound once,
 * through the constructor, from {@code llm-gateway.*} (application.yml, environment variables, command-line flags);
 * immutable afterwards. The circuit breakers are tuned by Resilience4j's own {@code resilience4j.*} properties.
 *
 * @param internalApiKey    the key the model service expects ({@code MODEL_SERVICE_API_KEY}); sent upstream instead
 *                          of the caller's
 * @param callerHeader      header that carries the authenticated caller's name upstream
 * @param maxBodySize       largest request body accepted at the edge (413 past it)
 * @param streamIdleTimeout longest silence between two chunks of a streamed answer before the gateway ends it
 */
@Validated
@ConfigurationProperties(prefix = "llm-gateway")
public record GatewayProperties(
        @DefaultValue("") String internalApiKey,
        @DefaultValue("X-Caller-Id") String callerHeader,
        @DefaultValue("1MB") DataSize maxBodySize,
        @DefaultValue("120s") Duration streamIdleTimeout,
        @Valid @DefaultValue List<ApiKey> apiKeys,
        @Valid @DefaultValue Jwt jwt,
        @Valid List<ModelRoute> routes,
        @Valid @DefaultValue Resilience resilience,
        @Valid @DefaultValue Upstream upstream,
        @Valid @DefaultValue Budget budget,
        @Valid @DefaultValue Edge edge) {

    public GatewayProperties {
        apiKeys = List.copyOf(apiKeys);
        // No routes configured: the one default route /v1/** -> lb://model-service.
        routes = routes == null ? List.of(ModelRoute.DEFAULT) : List.copyOf(routes);
    }

    /**
     * A caller authenticating with {@code Authorization: Bearer <key>}; only the key's SHA-256 is configured.
     *
     * @param name              the caller's name: logged, forwarded upstream, used for its limits
     * @param sha256            lower-case hex SHA-256 of the key ({@code printf %s "$KEY" | sha256sum})
     * @param models            models this caller may use; empty or "*" means all
     * @param requestsPerMinute requests per minute; 0 means unlimited
     * @param tokensPerMinute   LLM tokens (prompt + completion) per minute; 0 means unlimited
     */
    public record ApiKey(
            @NotBlank String name,
            @Pattern(regexp = "[0-9a-fA-F]{64}", message = "must be 64 hex characters (SHA-256)") String sha256,
            @DefaultValue List<String> models,
            @PositiveOrZero @DefaultValue("60") long requestsPerMinute,
            @PositiveOrZero @DefaultValue("20000") long tokensPerMinute) {
    }

    /**
     * Bearer JWTs from an identity provider (HS256 shared secret or RS256 public key).
     *
     * @param hmacSecret   HS256 shared secret (at least 32 bytes)
     * @param rsaPublicKey RS256 public key, PEM ("-----BEGIN PUBLIC KEY-----...")
     * @param issuer       required "iss", when set
     * @param audience     required member of "aud", when set
     * @param callerClaim  claim naming the caller
     * @param modelsClaim  claim listing allowed models (array of strings); absent means all
     * @param clockSkew    allowed clock skew for exp/nbf
     */
    public record Jwt(
            @DefaultValue("false") boolean enabled,
            @DefaultValue("") String hmacSecret,
            @DefaultValue("") String rsaPublicKey,
            @DefaultValue("") String issuer,
            @DefaultValue("") String audience,
            @DefaultValue("sub") String callerClaim,
            @DefaultValue("models") String modelsClaim,
            @DefaultValue("60s") Duration clockSkew,
            @PositiveOrZero @DefaultValue("60") long requestsPerMinute,
            @PositiveOrZero @DefaultValue("20000") long tokensPerMinute) {
    }

    /**
     * A route {@code /v1/** -> lb://service}. Requests whose JSON "model" is in {@code models} take it; a route
     * with no models takes every other request. One model service (one Nacos service) per route.
     *
     * @param service         the Nacos service name
     * @param models          model names served by this route; empty = the default route
     * @param fallbackRoute   when this route's service is down (no healthy instance, circuit open), retry on this
     *                        route instead
     * @param fallbackModel   the model name to put in the request when the fallback route serves it (empty: unchanged)
     * @param responseTimeout longest wait for the response headers. Non-streamed answers send their headers when
     *                        generation ends, so this bounds a whole non-streamed generation; a stream is then bounded
     *                        only by the stream idle timeout
     */
    public record ModelRoute(
            @NotBlank @Pattern(regexp = "[A-Za-z0-9_.-]+") @DefaultValue("model-service") String id,
            @NotBlank @DefaultValue("model-service") String service,
            @DefaultValue List<String> models,
            @DefaultValue("") String fallbackRoute,
            @DefaultValue("") String fallbackModel,
            @DefaultValue("300s") Duration responseTimeout,
            @DefaultValue("2s") Duration connectTimeout) {

        static final ModelRoute DEFAULT = new ModelRoute("model-service", "model-service", List.of(), "", "",
                Duration.ofSeconds(300), Duration.ofSeconds(2));
    }

    /**
     * Retries on another instance. The breakers (per route, per instance) are tuned in
     * {@code resilience4j.circuitbreaker.configs.*}.
     *
     * @param retries         further attempts on another instance after a connect failure or a retried status,
     *                        before any byte reached the client
     * @param failureStatuses upstream statuses that say "this pod is unhealthy": retried on another pod and counted as
     *                        failures by the instance breakers. Never a plain 500 or a 4xx: those depend on the
     *                        request, and retrying or counting them would let one caller's bad input open the breakers
     *                        for everyone
     * @param refusalStatuses statuses retried on another pod without counting as a failure: a pod's 429 (its batch
     *                        and queue are full, another pod may have room)
     * @param retryMethods    methods retried (the edge holds the body, so a POST can be replayed)
     */
    public record Resilience(
            @PositiveOrZero @DefaultValue("2") int retries,
            @DefaultValue("50ms") Duration retryBackoff,
            @NotEmpty @DefaultValue({"502", "503", "504"}) List<Integer> failureStatuses,
            @DefaultValue("429") List<Integer> refusalStatuses,
            @DefaultValue({"GET", "POST"}) List<String> retryMethods) {
    }

    /**
     * Where the gateway may send requests (and the internal key): model-service instances from Nacos are used
     * only when their address is in one of these networks.
     *
     * @param allowedNetworks CIDRs ("10.0.0.0/8", "::1/128"); an instance registered with a host name or outside them
     *                        is dropped
     */
    public record Upstream(@NotEmpty @DefaultValue({"127.0.0.0/8", "::1/128"}) List<String> allowedNetworks) {
    }

    /**
     * How a request is charged against its caller's token budget: on admission the gateway reserves the prompt
     * estimate plus the completion cap, and settles to the real usage when the answer ends.
     *
     * @param promptBytesPerToken the prompt estimate is the request body's size in bytes divided by this (JSON and
     *                            chat-template overhead included; ~4 bytes per token for English text)
     * @param defaultMaxTokens    completion tokens reserved when the request sets no max_tokens: the pods' own
     *                            default (MODEL_SERVICE_DEFAULT_MAX_TOKENS)
     */
    public record Budget(
            @Positive @DefaultValue("4") int promptBytesPerToken,
            @Positive @DefaultValue("1024") long defaultMaxTokens) {
    }

    /**
     * Limits on slow clients at the public port (with server.netty.idle-timeout).
     *
     * @param requestHeadTimeout longest time from a connection's opening (or its previous response's end) to a
     *                           complete request head, however the bytes trickle in
     * @param readTimeout        longest silence while reading a request body (a chunked body without its end, a short
     *                           Content-Length)
     * @param requestTimeout     longest time to read a whole request body
     */
    public record Edge(
            @DefaultValue("60s") Duration requestHeadTimeout,
            @DefaultValue("30s") Duration readTimeout,
            @DefaultValue("60s") Duration requestTimeout) {
    }
}
