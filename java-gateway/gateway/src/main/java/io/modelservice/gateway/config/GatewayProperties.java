package io.modelservice.gateway.config;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;

import jakarta.validation.Valid;
import jakarta.validation.constraints.NotBlank;
import jakarta.validation.constraints.NotEmpty;
import jakarta.validation.constraints.Pattern;
import jakarta.validation.constraints.Positive;
import jakarta.validation.constraints.PositiveOrZero;
import org.springframework.boot.context.properties.ConfigurationProperties;
import org.springframework.util.unit.DataSize;
import org.springframework.validation.annotation.Validated;

/**
 * Everything the gateway's own code reads: callers (API keys, JWT), limits, model routes, resilience.
 * Bound from {@code llm-gateway.*} (application.yml, environment variables, command-line flags).
 */
@Validated
@ConfigurationProperties(prefix = "llm-gateway")
public class GatewayProperties {

    /** The key the model service expects ({@code MODEL_SERVICE_API_KEY}); sent upstream instead of the caller's. */
    private String internalApiKey = "";

    /** Header that carries the authenticated caller's name upstream. */
    private String callerHeader = "X-Caller-Id";

    /** Largest request body accepted at the edge (413 past it). */
    private DataSize maxBodySize = DataSize.ofMegabytes(1);

    /** Longest silence between two chunks of a streamed answer before the gateway ends it. */
    private Duration streamIdleTimeout = Duration.ofSeconds(120);

    @Valid
    private List<ApiKey> apiKeys = new ArrayList<>();

    @Valid
    private Jwt jwt = new Jwt();

    @Valid
    private List<ModelRoute> routes = new ArrayList<>(List.of(new ModelRoute()));

    @Valid
    private Resilience resilience = new Resilience();

    @Valid
    private Upstream upstream = new Upstream();

    @Valid
    private Budget budget = new Budget();

    @Valid
    private Edge edge = new Edge();

    /** A caller authenticating with {@code Authorization: Bearer <key>}; only the key's SHA-256 is configured. */
    public static class ApiKey {
        /** The caller's name: logged, forwarded upstream, used for its limits. */
        @NotBlank
        private String name;
        /** Lower-case hex SHA-256 of the key ({@code printf %s "$KEY" | sha256sum}). */
        @Pattern(regexp = "[0-9a-fA-F]{64}", message = "must be 64 hex characters (SHA-256)")
        private String sha256;
        /** Models this caller may use; empty or "*" means all. */
        private List<String> models = new ArrayList<>();
        /** Requests per minute; 0 means unlimited. */
        @PositiveOrZero
        private long requestsPerMinute = 60;
        /** LLM tokens (prompt + completion) per minute; 0 means unlimited. */
        @PositiveOrZero
        private long tokensPerMinute = 20_000;

        public String getName() { return name; }
        public void setName(String name) { this.name = name; }
        public String getSha256() { return sha256; }
        public void setSha256(String sha256) { this.sha256 = sha256; }
        public List<String> getModels() { return models; }
        public void setModels(List<String> models) { this.models = models; }
        public long getRequestsPerMinute() { return requestsPerMinute; }
        public void setRequestsPerMinute(long v) { this.requestsPerMinute = v; }
        public long getTokensPerMinute() { return tokensPerMinute; }
        public void setTokensPerMinute(long v) { this.tokensPerMinute = v; }
    }

    /** Bearer JWTs from an identity provider (HS256 shared secret or RS256 public key). */
    public static class Jwt {
        private boolean enabled = false;
        /** HS256 shared secret (at least 32 bytes). */
        private String hmacSecret = "";
        /** RS256 public key, PEM ("-----BEGIN PUBLIC KEY-----..."). */
        private String rsaPublicKey = "";
        /** Required "iss", when set. */
        private String issuer = "";
        /** Required member of "aud", when set. */
        private String audience = "";
        /** Claim naming the caller. */
        private String callerClaim = "sub";
        /** Claim listing allowed models (array of strings); absent means all. */
        private String modelsClaim = "models";
        /** Allowed clock skew for exp/nbf. */
        private Duration clockSkew = Duration.ofSeconds(60);
        @PositiveOrZero
        private long requestsPerMinute = 60;
        @PositiveOrZero
        private long tokensPerMinute = 20_000;

        public boolean isEnabled() { return enabled; }
        public void setEnabled(boolean enabled) { this.enabled = enabled; }
        public String getHmacSecret() { return hmacSecret; }
        public void setHmacSecret(String v) { this.hmacSecret = v; }
        public String getRsaPublicKey() { return rsaPublicKey; }
        public void setRsaPublicKey(String v) { this.rsaPublicKey = v; }
        public String getIssuer() { return issuer; }
        public void setIssuer(String issuer) { this.issuer = issuer; }
        public String getAudience() { return audience; }
        public void setAudience(String audience) { this.audience = audience; }
        public String getCallerClaim() { return callerClaim; }
        public void setCallerClaim(String v) { this.callerClaim = v; }
        public String getModelsClaim() { return modelsClaim; }
        public void setModelsClaim(String v) { this.modelsClaim = v; }
        public Duration getClockSkew() { return clockSkew; }
        public void setClockSkew(Duration clockSkew) { this.clockSkew = clockSkew; }
        public long getRequestsPerMinute() { return requestsPerMinute; }
        public void setRequestsPerMinute(long v) { this.requestsPerMinute = v; }
        public long getTokensPerMinute() { return tokensPerMinute; }
        public void setTokensPerMinute(long v) { this.tokensPerMinute = v; }
    }

    /**
     * A route {@code /v1/** -> lb://service}. Requests whose JSON "model" is in {@code models} take it; a route
     * with no models takes every other request. One model service (one Nacos service) per route.
     */
    public static class ModelRoute {
        @NotBlank
        @Pattern(regexp = "[A-Za-z0-9_.-]+")
        private String id = "model-service";
        /** The Nacos service name. */
        @NotBlank
        private String service = "model-service";
        /** Model names served by this route; empty = the default route. */
        private List<String> models = new ArrayList<>();
        /** When this route's service is down (no healthy instance, circuit open), retry on this route instead. */
        private String fallbackRoute = "";
        /** The model name to put in the request when the fallback route serves it (empty: unchanged). */
        private String fallbackModel = "";
        /**
         * Longest wait for the response headers. Non-streamed answers send their headers when generation ends,
         * so this bounds a whole non-streamed generation; a stream is then bounded only by the stream idle timeout.
         */
        private Duration responseTimeout = Duration.ofSeconds(300);
        private Duration connectTimeout = Duration.ofSeconds(2);

        public String getId() { return id; }
        public void setId(String id) { this.id = id; }
        public String getService() { return service; }
        public void setService(String service) { this.service = service; }
        public List<String> getModels() { return models; }
        public void setModels(List<String> models) { this.models = models; }
        public String getFallbackRoute() { return fallbackRoute; }
        public void setFallbackRoute(String v) { this.fallbackRoute = v; }
        public String getFallbackModel() { return fallbackModel; }
        public void setFallbackModel(String v) { this.fallbackModel = v; }
        public Duration getResponseTimeout() { return responseTimeout; }
        public void setResponseTimeout(Duration v) { this.responseTimeout = v; }
        public Duration getConnectTimeout() { return connectTimeout; }
        public void setConnectTimeout(Duration v) { this.connectTimeout = v; }
    }

    /** Retries, per-instance and per-route circuit breakers. */
    public static class Resilience {
        /** Further attempts on another instance after a connect failure or a retried status, before any byte reached
         *  the client. */
        @PositiveOrZero
        private int retries = 2;
        private Duration retryBackoff = Duration.ofMillis(50);
        /** Upstream statuses that say "this pod is unhealthy": retried on another pod and counted as failures by the
         *  instance breakers. Never a plain 500 or a 4xx: those depend on the request, and retrying or counting
         *  them would let one caller's bad input open the breakers for everyone. */
        @NotEmpty
        private List<Integer> failureStatuses = new ArrayList<>(List.of(502, 503, 504));
        /** Statuses retried on another pod without counting as a failure: a pod's 429 (its batch and queue are full,
         *  another pod may have room). */
        private List<Integer> refusalStatuses = new ArrayList<>(List.of(429));
        /** Methods retried (the edge holds the body, so a POST can be replayed). */
        private List<String> retryMethods = new ArrayList<>(List.of("GET", "POST"));
        /** Failure rate (percent) over the window that opens a breaker. */
        private float failureRateThreshold = 50;
        /** Calls in the sliding window of a breaker. */
        private int slidingWindowSize = 10;
        /** Calls needed before a breaker computes a failure rate. */
        private int minimumNumberOfCalls = 4;
        /** How long an open breaker stays open before letting trial calls through. */
        private Duration openStateWait = Duration.ofSeconds(15);

        public List<Integer> getFailureStatuses() { return failureStatuses; }
        public void setFailureStatuses(List<Integer> v) { this.failureStatuses = v; }
        public List<Integer> getRefusalStatuses() { return refusalStatuses; }
        public void setRefusalStatuses(List<Integer> v) { this.refusalStatuses = v; }
        public List<String> getRetryMethods() { return retryMethods; }
        public void setRetryMethods(List<String> v) { this.retryMethods = v; }
        public int getRetries() { return retries; }
        public void setRetries(int retries) { this.retries = retries; }
        public Duration getRetryBackoff() { return retryBackoff; }
        public void setRetryBackoff(Duration v) { this.retryBackoff = v; }
        public float getFailureRateThreshold() { return failureRateThreshold; }
        public void setFailureRateThreshold(float v) { this.failureRateThreshold = v; }
        public int getSlidingWindowSize() { return slidingWindowSize; }
        public void setSlidingWindowSize(int v) { this.slidingWindowSize = v; }
        public int getMinimumNumberOfCalls() { return minimumNumberOfCalls; }
        public void setMinimumNumberOfCalls(int v) { this.minimumNumberOfCalls = v; }
        public Duration getOpenStateWait() { return openStateWait; }
        public void setOpenStateWait(Duration v) { this.openStateWait = v; }
    }

    /** Where the gateway may send requests (and the internal key): model-service instances from Nacos are used
     *  only when their address is in one of these networks. */
    public static class Upstream {
        /** CIDRs ("10.0.0.0/8", "::1/128"); an instance registered with a host name or outside them is dropped. */
        @NotEmpty
        private List<String> allowedNetworks = new ArrayList<>(List.of("127.0.0.0/8", "::1/128"));

        public List<String> getAllowedNetworks() { return allowedNetworks; }
        public void setAllowedNetworks(List<String> v) { this.allowedNetworks = v; }
    }

    /**
     * How a request is charged against its caller's token budget: on admission the gateway reserves the prompt
     * estimate plus the completion cap, and settles to the real usage when the answer ends.
     */
    public static class Budget {
        /** The prompt estimate is the request body's size in bytes divided by this (JSON and chat-template overhead
         *  included; ~4 bytes per token for English text). */
        @Positive
        private int promptBytesPerToken = 4;
        /** Completion tokens reserved when the request sets no max_tokens: the pods' own default
         *  (MODEL_SERVICE_DEFAULT_MAX_TOKENS). */
        @Positive
        private long defaultMaxTokens = 1024;

        public int getPromptBytesPerToken() { return promptBytesPerToken; }
        public void setPromptBytesPerToken(int v) { this.promptBytesPerToken = v; }
        public long getDefaultMaxTokens() { return defaultMaxTokens; }
        public void setDefaultMaxTokens(long v) { this.defaultMaxTokens = v; }
    }

    /** Limits on slow clients at the public port (with server.netty.idle-timeout). */
    public static class Edge {
        /** Longest time from a connection's opening (or its previous response's end) to a complete request head,
         *  however the bytes trickle in. */
        private Duration requestHeadTimeout = Duration.ofSeconds(60);
        /** Longest silence while reading a request body (a chunked body without its end, a short Content-Length). */
        private Duration readTimeout = Duration.ofSeconds(30);
        /** Longest time to read a whole request body. */
        private Duration requestTimeout = Duration.ofSeconds(60);

        public Duration getRequestHeadTimeout() { return requestHeadTimeout; }
        public void setRequestHeadTimeout(Duration v) { this.requestHeadTimeout = v; }
        public Duration getReadTimeout() { return readTimeout; }
        public void setReadTimeout(Duration v) { this.readTimeout = v; }
        public Duration getRequestTimeout() { return requestTimeout; }
        public void setRequestTimeout(Duration v) { this.requestTimeout = v; }
    }

    public Upstream getUpstream() { return upstream; }
    public void setUpstream(Upstream upstream) { this.upstream = upstream; }
    public Budget getBudget() { return budget; }
    public void setBudget(Budget budget) { this.budget = budget; }
    public Edge getEdge() { return edge; }
    public void setEdge(Edge edge) { this.edge = edge; }
    public String getInternalApiKey() { return internalApiKey; }
    public void setInternalApiKey(String v) { this.internalApiKey = v; }
    public String getCallerHeader() { return callerHeader; }
    public void setCallerHeader(String v) { this.callerHeader = v; }
    public DataSize getMaxBodySize() { return maxBodySize; }
    public void setMaxBodySize(DataSize v) { this.maxBodySize = v; }
    public Duration getStreamIdleTimeout() { return streamIdleTimeout; }
    public void setStreamIdleTimeout(Duration v) { this.streamIdleTimeout = v; }
    public List<ApiKey> getApiKeys() { return apiKeys; }
    public void setApiKeys(List<ApiKey> apiKeys) { this.apiKeys = apiKeys; }
    public Jwt getJwt() { return jwt; }
    public void setJwt(Jwt jwt) { this.jwt = jwt; }
    public List<ModelRoute> getRoutes() { return routes; }
    public void setRoutes(List<ModelRoute> routes) { this.routes = routes; }
    public Resilience getResilience() { return resilience; }
    public void setResilience(Resilience resilience) { this.resilience = resilience; }
}
