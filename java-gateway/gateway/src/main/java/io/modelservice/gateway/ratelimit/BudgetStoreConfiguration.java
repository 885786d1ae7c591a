package io.modelservice.gateway.ratelimit;

import java.time.Duration;
import java.util.concurrent.TimeUnit;

import io.lettuce.core.ClientOptions;
import io.lettuce.core.resource.Delay;
import io.micrometer.core.instrument.MeterRegistry;
import org.springframework.boot.actuate.health.Health;
import org.springframework.boot.actuate.health.ReactiveHealthIndicator;
import org.springframework.boot.actuate.health.Status;
import org.springframework.boot.autoconfigure.condition.ConditionalOnProperty;
import org.springframework.boot.autoconfigure.data.redis.ClientResourcesBuilderCustomizer;
import org.springframework.boot.autoconfigure.data.redis.LettuceClientConfigurationBuilderCustomizer;
import org.springframework.boot.context.properties.EnableConfigurationProperties;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.data.redis.core.ReactiveStringRedisTemplate;
import reactor.core.publisher.Mono;

/**
 * {@code llm-gateway.budgets.store=redis}: the callers' budgets in Redis ({@link RedisCallerBudgets}), its state in
 * {@code /actuator/health} (component {@code budgetStore}) and in {@code llm_gateway_budget_store_up}. With the
 * default {@code memory} none of this exists and nothing connects to Redis.
 */
@Configuration(proxyBeanMethods = false)
@EnableConfigurationProperties(BudgetStoreProperties.class)
@ConditionalOnProperty(name = "llm-gateway.budgets.store", havingValue = "redis")
public class BudgetStoreConfiguration {

    /** The health of a replica whose store is down but which keeps serving with local limits (fail-open): it does
     *  not take the overall status down (Spring's aggregation ignores statuses it does not order). */
    public static final Status DEGRADED = new Status("DEGRADED", "Redis unreachable; limits are per replica");

    @Bean
    public RedisCallerBudgets callerBudgets(ReactiveStringRedisTemplate redis, BudgetStoreProperties properties,
                                            MeterRegistry meters) {
        return new RedisCallerBudgets(redis, properties, meters);
    }

    @Bean
    public ReactiveHealthIndicator budgetStoreHealthIndicator(RedisCallerBudgets budgets) {
        return () -> Mono.fromSupplier(() -> {
            if (budgets.isUp()) {
                return Health.up().withDetail("store", "redis").build();
            }
            boolean closed = budgets.whenRedisDown() == BudgetStoreProperties.WhenRedisDown.FAIL_CLOSED;
            return Health.status(closed ? Status.DOWN : DEGRADED).withDetail("store", "redis")
                    .withDetail("when_redis_down", closed ? "fail-closed" : "fail-open").build();
        });
    }

    /** While disconnected, Lettuce refuses commands at once instead of queueing them: a queued admission would
     *  run (and take budget) after the request had already been decided without Redis. */
    @Bean
    public LettuceClientConfigurationBuilderCustomizer budgetStoreClientOptions() {
        return builder -> builder.clientOptions(ClientOptions.builder()
                .autoReconnect(true)
                .disconnectedBehavior(ClientOptions.DisconnectedBehavior.REJECT_COMMANDS)
                .build());
    }

    /** Reconnect within about a second once Redis is back (Lettuce's default backs off to 30 s). */
    @Bean
    public ClientResourcesBuilderCustomizer budgetStoreReconnectDelay() {
        return builder -> builder.reconnectDelay(
                Delay.exponential(Duration.ofMillis(50), Duration.ofSeconds(1), 2, TimeUnit.MILLISECONDS));
    }
}
