package io.modelservice.gateway.ratelimit;

import java.time.Duration;

import org.springframework.boot.context.properties.ConfigurationProperties;
import org.springframework.boot.context.properties.bind.DefaultValue;

/**
 * Where the callers' budgets live ({@code llm-gateway.budgets.*}). The Redis connection itself is Spring's
 * {@code spring.data.redis.*} ({@code url}, {@code host}, {@code port}, {@code password}, ...).
 *
 * @param store           {@code memory}: in this process (one replica; a restart forgets what was spent);
 *                        {@code redis}: shared by every replica and kept across restarts.
 * @param whenRedisDown   {@code fail-open}: keep serving with each replica's own in-memory limits until Redis is
 *                        back; {@code fail-closed}: refuse {@code /v1} requests with 503 until it is back.
 * @param redisTimeout    longest wait for one budget operation; past it Redis counts as down.
 * @param probeInterval   how often Redis is pinged (its state for the metric and health, and to notice it is back).
 * @param keyPrefix       prefix of the budget keys ({@code <prefix>{<caller key>}:tokens} / {@code :requests}).
 */
@ConfigurationProperties(prefix = "llm-gateway.budgets")
public record BudgetStoreProperties(
        @DefaultValue("memory") Store store,
        @DefaultValue("fail-open") WhenRedisDown whenRedisDown,
        @DefaultValue("500ms") Duration redisTimeout,
        @DefaultValue("1s") Duration probeInterval,
        @DefaultValue("llm-gateway:budget:") String keyPrefix) {

    public enum Store { MEMORY, REDIS }

    public enum WhenRedisDown { FAIL_OPEN, FAIL_CLOSED }
}
