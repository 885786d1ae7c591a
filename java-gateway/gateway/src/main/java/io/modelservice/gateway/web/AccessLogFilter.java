package io.modelservice.gateway.web;

import io.modelservice.gateway.auth.Caller;
import io.modelservice.gateway.usage.Usage;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.slf4j.spi.LoggingEventBuilder;
import org.springframework.core.Ordered;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import reactor.core.publisher.Mono;

/**
 * One structured log line per API request when its answer has ended: caller, model, status, tokens, latency,
 * the instance that answered. Never the prompt or the answer, never a credential.
 */
@Component
public class AccessLogFilter implements WebFilter, Ordered {

    private static final Logger ACCESS = LoggerFactory.getLogger("llm_gateway.access");

    @Override
    public int getOrder() {
        return EdgeOrder.ACCESS_LOG;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
        String path = exchange.getRequest().getPath().value();
        if (path.startsWith("/actuator")) {
            return chain.filter(exchange);
        }
        long started = System.nanoTime();
        return chain.filter(exchange).doFinally(signal -> log(exchange, path, started, signal.toString()));
    }

    private static void log(ServerWebExchange exchange, String path, long started, String signal) {
        var status = exchange.getResponse().getStatusCode();
        Integer answeredStatus = exchange.getAttribute(GatewayAttributes.ANSWERED_STATUS);
        Caller caller = exchange.getAttribute(GatewayAttributes.CALLER);
        Usage usage = exchange.getAttribute(GatewayAttributes.USAGE);
        LoggingEventBuilder event = ACCESS.atInfo()
                .addKeyValue("method", exchange.getRequest().getMethod().name())
                .addKeyValue("path", path)
                .addKeyValue("status", answeredStatus != null ? answeredStatus : status == null ? 0 : status.value())
                .addKeyValue("latency_ms", (System.nanoTime() - started) / 1_000_000);
        if (caller != null) {
            event = event.addKeyValue("caller", caller.name()).addKeyValue("auth", caller.method());
        }
        Object model = exchange.getAttribute(GatewayAttributes.MODEL);
        if (model != null) {
            event = event.addKeyValue("model", model);
        }
        Object stream = exchange.getAttribute(GatewayAttributes.STREAM);
        if (stream != null) {
            event = event.addKeyValue("stream", stream);
        }
        if (usage != null) {
            event = event.addKeyValue("prompt_tokens", usage.promptTokens())
                    .addKeyValue("completion_tokens", usage.completionTokens())
                    .addKeyValue("total_tokens", usage.totalTokens())
                    .addKeyValue("usage_reported", usage.reported());
        }
        Object upstream = exchange.getAttribute(GatewayAttributes.UPSTREAM);
        if (upstream != null) {
            event = event.addKeyValue("upstream", upstream);
        }
        java.util.Set<?> tried = exchange.getAttribute(GatewayAttributes.TRIED_INSTANCES);
        if (tried != null) {
            event = event.addKeyValue("attempts", tried.size());
        }
        Object error = exchange.getAttribute(GatewayAttributes.ERROR_CODE);
        if (error != null) {
            event = event.addKeyValue("error", error);
        }
        if (!"onComplete".equals(signal)) {
            event = event.addKeyValue("ended", signal);
        }
        event.log("request");
    }
}
