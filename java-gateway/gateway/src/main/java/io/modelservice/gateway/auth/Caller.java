package io.modelservice.gateway.auth;

import java.util.Set;

/**
 * An authenticated caller: its name (logged and forwarded upstream), how it authenticated, the models it may use
 * (empty = all) and its limits (0 = unlimited).
 */
public record Caller(String name, String method, Set<String> models, long requestsPerMinute, long tokensPerMinute) {

    /** Whether the caller may send this model name (a restricted caller must name one of its models). */
    public boolean mayUse(String model) {
        return models.isEmpty() || models.contains("*") || (model != null && models.contains(model));
    }

    /** The key the limits are counted under. */
    public String limitKey() {
        return method + ":" + name;
    }
}
