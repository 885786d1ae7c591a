package io.modelservice.gateway.web;

import org.springframework.core.Ordered;
import org.springframework.stereotype.Component;
import org.springframework.web.server.ServerWebExchange;
import org.springframework.web.server.WebFilter;
import org.springframework.web.server.WebFilterChain;
import reactor.core.publisher.Mono;

/**
 * Refuses (400 {@code invalid_path}) every request whose raw path is not already in its normal form: no
 * %-escapes, no {@code ;} parameters, no empty segment ({@code //}), no {@code .} or {@code ..} segment, no
 * backslash. Routes match the decoded path with parameters removed, so without this {@code /%761/...} or
 * {@code /__gateway;x/...} would match a route while every check on the raw path saw something else. With it, the
 * path the edge checks is the path the routes match. No OpenAI path needs any of these.
 */
@Component
public class CanonicalPathFilter implements WebFilter, Ordered {

    private final OpenAiErrors errors;

    public CanonicalPathFilter(OpenAiErrors errors) {
        this.errors = errors;
    }

    @Override
    public int getOrder() {
        return EdgeOrder.CANONICAL_PATH;
    }

    @Override
    public Mono<Void> filter(ServerWebExchange exchange, WebFilterChain chain) {
        String raw = exchange.getRequest().getURI().getRawPath();
        if (isCanonical(raw)) {
            return chain.filter(exchange);
        }
        return errors.reject(exchange, OpenAiErrors.badRequest(
                "The request path must not contain %-escapes, ';', '\\\\', empty or dot segments.", "invalid_path"),
                "invalid_path");
    }

    /** Whether the raw path equals its normal form (decoded, parameters stripped, slashes and dots resolved). */
    public static boolean isCanonical(String raw) {
        if (raw == null || raw.isEmpty()) {
            return true;  // "/" is implied
        }
        if (raw.charAt(0) != '/' || raw.indexOf('%') >= 0 || raw.indexOf(';') >= 0 || raw.indexOf('\\') >= 0
                || raw.contains("//")) {
            return false;
        }
        for (String segment : raw.split("/", -1)) {
            if (segment.equals(".") || segment.equals("..")) {
                return false;
            }
        }
        return true;
    }
}
