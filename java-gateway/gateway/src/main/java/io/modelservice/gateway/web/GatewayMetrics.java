package io.modelservice.gateway.web;

import io.micrometer.core.instrument.Counter;
import io.micrometer.core.instrument.MeterRegistry;
import io.modelservice.gateway.auth.Caller;
import io.modelservice.gateway.usage.Usage;
import org.springframework.stereotype.Component;

/**
 * The gateway's own Prometheus series (next to Spring Cloud Gateway's {@code spring_cloud_gateway_requests_*}):
 * tokens per caller and model, rejections at the edge, upstream attempts per outcome.
 */
@Component
public class GatewayMetrics {

    private final MeterRegistry registry;

    public GatewayMetrics(MeterRegistry registry) {
        this.registry = registry;
    }

    public void tokens(Caller caller, String model, Usage usage) {
        String m = model == null ? "unknown" : model;
        String c = callerTag(caller);
        counter("llm_gateway_tokens", "prompt", c, m).increment(usage.promptTokens());
        counter("llm_gateway_tokens", "completion", c, m).increment(usage.completionTokens());
    }

    public void rateLimited(Caller caller, String limit) {
        Counter.builder("llm_gateway_rate_limited").description("Requests refused by a caller's budget")
                .tag("caller", callerTag(caller)).tag("limit", limit).register(registry).increment();
    }

    public void rejected(String reason) {
        Counter.builder("llm_gateway_rejected").description("Requests answered by the gateway itself with an error")
                .tag("reason", reason).register(registry).increment();
    }

    public void upstreamAttempt(String outcome) {
        Counter.builder("llm_gateway_upstream_attempts").description("Attempts on model-service instances")
                .tag("outcome", outcome).register(registry).increment();
    }

    private Counter counter(String name, String kind, String caller, String model) {
        return Counter.builder(name).description("LLM tokens used through the gateway")
                .tag("kind", kind).tag("caller", caller).tag("model", model).register(registry);
    }

    /** API key names are few and configured; JWT subjects are many, so they share one tag value. */
    private static String callerTag(Caller caller) {
        return caller.method().equals("jwt") ? "jwt" : caller.name();
    }
}
