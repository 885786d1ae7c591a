package io.modelservice.gateway.ratelimit;

import java.time.Duration;
import java.util.List;
import java.util.concurrent.atomic.AtomicBoolean;

import io.micrometer.core.instrument.Gauge;
import io.micrometer.core.instrument.MeterRegistry;
import io.modelservice.gateway.auth.Caller;
import io.modelservice.gateway.ratelimit.BudgetStoreProperties.WhenRedisDown;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.DisposableBean;
import org.springframework.core.io.ClassPathResource;
import org.springframework.data.redis.core.ReactiveStringRedisTemplate;
import org.springframework.data.redis.core.script.RedisScript;
import reactor.core.Disposable;
import reactor.core.publisher.Flux;
import reactor.core.publisher.Mono;
import reactor.core.scheduler.Schedulers;

/**
 * Caller budgets shared by every gateway replica through Redis, with the semantics of {@link CallerBudgets}: one
 * Lua script ({@code budgets/caller-budgets.lua}) refills, checks and reserves atomically on admission (one round
 * trip, {@code EVALSHA}); the settlement runs the same script in its other mode. The buckets live in Redis, so a
 * restarted replica keeps what was spent; their clock is Redis's {@code TIME}, so replicas' clocks do not matter.
 *
 * <p>Why a Lua script rather than Bucket4j's Redis backend: Bucket4j's buckets consume only what is there
 * ({@code tryConsume}) or unconditionally ({@code consumeIgnoringRateLimits}); "admit while positive, then take the
 * whole reservation" would be two remote operations (a check, then a forced take), not atomic across replicas,
 * and its compare-and-swap proxy costs two round trips under contention. The script is 60 lines, one round trip,
 * exactly the in-memory arithmetic (tested against both), and needs no further dependency.
 *
 * <p>When Redis cannot be reached (an error, or no answer within {@code redis-timeout}) the store is marked down,
 * logged once, and every request skips Redis until a background ping ({@code probe-interval}) finds it again:
 * {@code fail-open} decides with this replica's own in-memory buckets (so N replicas allow N budgets meanwhile),
 * {@code fail-closed} refuses with 503. A settlement that cannot reach Redis is dropped (the caller keeps its
 * reservation charged: errs on the safe side). Requests admitted locally during an outage are settled wherever
 * the store is when they end (at most one reservation each).
 */
public class RedisCallerBudgets implements CallerBudgets, DisposableBean {

    private static final Logger log = LoggerFactory.getLogger(RedisCallerBudgets.class);

    private static final RedisScript<String> SCRIPT =
            RedisScript.of(new ClassPathResource("budgets/caller-budgets.lua"), String.class);

    private final ReactiveStringRedisTemplate redis;
    private final BudgetStoreProperties properties;
    private final InMemoryCallerBudgets local = new InMemoryCallerBudgets();
    private final AtomicBoolean up = new AtomicBoolean(true);
    private final Disposable prober;

    public RedisCallerBudgets(ReactiveStringRedisTemplate redis, BudgetStoreProperties properties,
                              MeterRegistry meters) {
        this.redis = redis;
        this.properties = properties;
        Gauge.builder("llm_gateway_budget_store_up", up, u -> u.get() ? 1 : 0)
                .description("1 while the shared budget store (Redis) answers, 0 while the gateway decides without it "
                        + "(llm-gateway.budgets.when-redis-down)")
                .tag("store", "redis").register(meters);
        warmUp();
        this.prober = Flux.interval(properties.probeInterval(), Schedulers.boundedElastic())
                .onBackpressureDrop()
                .concatMap(tick -> ping(), 1)
                .subscribe();
    }

    /** At start-up, off any request: opens the connection and runs the script once (with no limit it changes
     *  nothing), so that a cold start is not mistaken for an outage; Redis down now is logged as one. */
    private void warmUp() {
        Caller nobody = new Caller("warm-up", "gateway", java.util.Set.of(), 0, 0);
        Duration patience = properties.redisTimeout().multipliedBy(10);
        try {
            redis.execute(SCRIPT, keys(nobody), List.of("admit", "0", "0", "0")).next().block(patience);
        } catch (RuntimeException e) {
            markDown(e);
        }
    }

    /** Whether Redis answered its last operation or ping. */
    public boolean isUp() {
        return up.get();
    }

    public WhenRedisDown whenRedisDown() {
        return properties.whenRedisDown();
    }

    @Override
    public Mono<Decision> admitAsync(Caller caller, long reservedTokens) {
        if (!up.get()) {
            return withoutRedis(caller, reservedTokens);
        }
        long reserved = Math.max(0, reservedTokens);
        return redis.execute(SCRIPT, keys(caller), List.of("admit", Long.toString(caller.tokensPerMinute()),
                        Long.toString(caller.requestsPerMinute()), Long.toString(reserved)))
                .next()
                .timeout(properties.redisTimeout())
                .map(RedisCallerBudgets::decision)
                .doOnNext(d -> markUp())
                .onErrorResume(e -> {
                    markDown(e);
                    return withoutRedis(caller, reservedTokens);
                });
    }

    /** Blocking form of {@link #admitAsync}: never call it on an event-loop thread (the gateway does not). */
    @Override
    public Decision admit(Caller caller, long reservedTokens) {
        return admitAsync(caller, reservedTokens).block();
    }

    /** Sent without waiting: the script runs in Redis before any later command of this replica (one connection,
     *  in order), and the answer's end reaches the client only after it was sent. */
    @Override
    public void settle(Caller caller, long reservedTokens, long usedTokens) {
        if (caller.tokensPerMinute() <= 0 || reservedTokens == usedTokens) {
            return;
        }
        if (!up.get()) {
            local.settle(caller, reservedTokens, usedTokens);
            return;
        }
        redis.execute(SCRIPT, keys(caller), List.of("settle", Long.toString(caller.tokensPerMinute()),
                        Long.toString(reservedTokens - usedTokens)))
                .next()
                .timeout(properties.redisTimeout())
                .subscribe(ok -> markUp(), this::markDown);
    }

    private Mono<Decision> withoutRedis(Caller caller, long reservedTokens) {
        if (properties.whenRedisDown() == WhenRedisDown.FAIL_CLOSED) {
            return Mono.error(new BudgetStoreUnavailableException(
                    "The rate-limit store is unavailable. Please retry later."));
        }
        return Mono.fromSupplier(() -> local.admit(caller, reservedTokens));
    }

    /** The Redis keys of a caller's budgets; one hash tag, so both live in the same Redis Cluster slot. */
    List<String> keys(Caller caller) {
        String base = properties.keyPrefix() + "{" + caller.limitKey() + "}:";
        return List.of(base + "tokens", base + "requests");
    }

    /** Parses the script's answer: "ok", or "<limit> <seconds>". */
    static Decision decision(String answer) {
        if ("ok".equals(answer)) {
            return Decision.ALLOWED;
        }
        int space = answer.indexOf(' ');
        if (space < 0) {
            throw new IllegalStateException("unexpected answer from caller-budgets.lua: " + answer);
        }
        return Decision.refused(answer.substring(0, space), Long.parseLong(answer.substring(space + 1)));
    }

    private Mono<Void> ping() {
        return redis.execute(connection -> connection.ping())
                .next()
                .timeout(properties.redisTimeout())
                .doOnNext(pong -> markUp())
                .onErrorResume(e -> {
                    markDown(e);
                    return Mono.empty();
                })
                .then();
    }

    private void markUp() {
        if (up.compareAndSet(false, true)) {
            log.atInfo().addKeyValue("store", "redis")
                    .log("caller budgets: Redis reachable again; limits are shared by every replica again");
        }
    }

    private void markDown(Throwable e) {
        if (up.compareAndSet(true, false)) {
            log.atWarn().addKeyValue("store", "redis").addKeyValue("when_redis_down", properties.whenRedisDown())
                    .addKeyValue("error", e.toString())
                    .log(properties.whenRedisDown() == WhenRedisDown.FAIL_CLOSED
                            ? "caller budgets: Redis unreachable; refusing requests (503) until it is back"
                            : "caller budgets: Redis unreachable; each replica applies its own in-memory limits "
                                    + "until it is back");
        }
    }

    @Override
    public void destroy() {
        prober.dispose();
    }
}
