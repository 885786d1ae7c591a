package io.modelservice.gateway.ratelimit;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

import io.lettuce.core.ClientOptions;
import io.lettuce.core.resource.ClientResources;
import io.lettuce.core.resource.DefaultClientResources;
import io.lettuce.core.resource.Delay;
import io.micrometer.core.instrument.simple.SimpleMeterRegistry;
import io.modelservice.gateway.auth.Caller;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.springframework.data.redis.connection.RedisStandaloneConfiguration;
import org.springframework.data.redis.connection.lettuce.LettuceClientConfiguration;
import org.springframework.data.redis.connection.lettuce.LettuceConnectionFactory;
import org.springframework.data.redis.core.ReactiveStringRedisTemplate;

import static org.assertj.core.api.Assertions.assertThat;
import static org.assertj.core.api.Assertions.assertThatThrownBy;

/**
 * {@link RedisCallerBudgets} against a real redis-server: the Lua script's arithmetic next to the in-memory one,
 * budgets shared by two "replicas" (two clients), kept across a restart of the client, and both behaviours while
 * Redis is down. Redis's own clock runs, so levels are compared with the refill of the test's duration allowed.
 */
class RedisCallerBudgetsTest {

    static RedisServerProcess redis;
    final List<LettuceConnectionFactory> factories = new ArrayList<>();
    final List<ClientResources> resources = new ArrayList<>();
    final List<RedisCallerBudgets> opened = new ArrayList<>();
    final SimpleMeterRegistry meters = new SimpleMeterRegistry();

    @BeforeAll
    static void startRedis() throws Exception {
        redis = RedisServerProcess.startNew();
    }

    @AfterAll
    static void stopRedis() throws Exception {
        if (redis != null) {
            redis.close();
        }
    }

    @AfterEach
    void closeClients() {
        opened.forEach(RedisCallerBudgets::destroy);
        factories.forEach(LettuceConnectionFactory::destroy);
        resources.forEach(ClientResources::shutdown);
    }

    /** A gateway replica's budgets: its own connection, configured like BudgetStoreConfiguration does. */
    RedisCallerBudgets replica(BudgetStoreProperties.WhenRedisDown whenDown) {
        ClientResources clientResources = DefaultClientResources.builder().reconnectDelay(
                Delay.exponential(Duration.ofMillis(50), Duration.ofSeconds(1), 2, TimeUnit.MILLISECONDS)).build();
        resources.add(clientResources);
        LettuceClientConfiguration client = LettuceClientConfiguration.builder()
                .clientOptions(ClientOptions.builder()
                        .disconnectedBehavior(ClientOptions.DisconnectedBehavior.REJECT_COMMANDS).build())
                .clientResources(clientResources)
                .commandTimeout(Duration.ofSeconds(1))
                .build();
        LettuceConnectionFactory factory = new LettuceConnectionFactory(
                new RedisStandaloneConfiguration("127.0.0.1", redis.port), client);
        factory.afterPropertiesSet();
        factory.start();
        factories.add(factory);
        RedisCallerBudgets budgets = new RedisCallerBudgets(new ReactiveStringRedisTemplate(factory),
                new BudgetStoreProperties(BudgetStoreProperties.Store.REDIS, whenDown, Duration.ofMillis(500),
                        Duration.ofMillis(200), "test:budget:"), meters);
        opened.add(budgets);
        return budgets;
    }

    RedisCallerBudgets replica() {
        return replica(BudgetStoreProperties.WhenRedisDown.FAIL_OPEN);
    }

    static Caller caller(String name, long requestsPerMinute, long tokensPerMinute) {
        return new Caller(name + System.nanoTime(), "api_key", Set.of(), requestsPerMinute, tokensPerMinute);
    }

    double level(RedisCallerBudgets budgets, Caller caller) {
        String key = budgets.keys(caller).get(0);
        Object level = factories.get(0).getConnection().hashCommands().hGet(key.getBytes(), "level".getBytes());
        return Double.parseDouble(new String((byte[]) level));
    }

    @Test
    void requestsPerMinuteAreSharedByReplicas() {
        RedisCallerBudgets a = replica();
        RedisCallerBudgets b = replica();
        Caller caller = caller("rpm", 5, 0);
        int allowed = 0;
        for (int i = 0; i < 5; i++) {
            allowed += (i % 2 == 0 ? a : b).admit(caller, 0).allowed() ? 1 : 0;
        }
        assertThat(allowed).isEqualTo(5);
        for (RedisCallerBudgets replica : List.of(a, b)) {
            CallerBudgets.Decision refused = replica.admit(caller, 0);
            assertThat(refused.allowed()).isFalse();
            assertThat(refused.limit()).isEqualTo("requests");
            assertThat(refused.retryAfterSeconds()).isBetween(11L, 12L);  // one request refills every 60/5 s
        }
    }

    @Test
    void reservesAndSettlesLikeTheInMemoryBuckets() {
        // The same sequence as InMemoryCallerBudgetsTest.reservesOnAdmissionAndSettlesToTheRealUsage, split over
        // two replicas; 60 tokens/minute refill 1 per second, so the test's own duration adds a fraction.
        RedisCallerBudgets a = replica();
        RedisCallerBudgets b = replica();
        Caller caller = caller("tpm", 0, 60);
        assertThat(a.admit(caller, 50).allowed()).isTrue();
        assertThat(level(a, caller)).isCloseTo(10.0, org.assertj.core.data.Offset.offset(0.5));
        b.settle(caller, 50, 20);
        await(() -> level(a, caller) > 39);
        assertThat(level(a, caller)).isCloseTo(40.0, org.assertj.core.data.Offset.offset(0.5));
        assertThat(b.admit(caller, 30).allowed()).isTrue();       // 10 left: still admitted
        a.settle(caller, 30, 70);                                 // used more: overdrawn to -30
        await(() -> level(a, caller) < -29);
        CallerBudgets.Decision refused = b.admit(caller, 1);
        assertThat(refused.allowed()).isFalse();
        assertThat(refused.limit()).isEqualTo("tokens");
        assertThat(refused.retryAfterSeconds()).isBetween(30L, 31L);
        assertThat(level(a, caller)).isCloseTo(-30.0, org.assertj.core.data.Offset.offset(0.5));
    }

    @Test
    void aRestartedReplicaKeepsWhatWasSpent() {
        Caller caller = caller("restart", 2, 0);
        RedisCallerBudgets before = replica();
        assertThat(before.admit(caller, 0).allowed()).isTrue();
        assertThat(before.admit(caller, 0).allowed()).isTrue();
        before.destroy();
        RedisCallerBudgets after = replica();
        assertThat(after.admit(caller, 0).allowed()).isFalse();
    }

    @Test
    void aParallelBurstOnTwoReplicasOvershootsByAtMostOneReservation() throws Exception {
        RedisCallerBudgets a = replica();
        RedisCallerBudgets b = replica();
        Caller caller = caller("burst", 0, 300);
        long reservation = 53;
        int threads = 20;
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        CountDownLatch go = new CountDownLatch(1);
        List<Future<Boolean>> results = new ArrayList<>();
        for (int i = 0; i < threads; i++) {
            RedisCallerBudgets replica = i % 2 == 0 ? a : b;
            results.add(pool.submit(() -> {
                go.await();
                return replica.admit(caller, reservation).allowed();
            }));
        }
        go.countDown();
        int allowed = 0;
        for (Future<Boolean> result : results) {
            allowed += result.get(10, TimeUnit.SECONDS) ? 1 : 0;
        }
        pool.shutdown();
        // 300 / 53 = 5.66: six reservations fit while the level is positive, the sixth overdraws it
        assertThat(allowed).isEqualTo(6);
    }

    @Test
    void failOpenDecidesLocallyWhileRedisIsDownAndSharesAgainOnceBack() throws Exception {
        RedisCallerBudgets a = replica(BudgetStoreProperties.WhenRedisDown.FAIL_OPEN);
        Caller caller = caller("open", 3, 0);
        for (int i = 0; i < 3; i++) {
            assertThat(a.admit(caller, 0).allowed()).isTrue();
        }
        assertThat(a.admit(caller, 0).allowed()).isFalse();           // shared budget spent
        redis.stop();
        try {
            // Redis's budget is spent, but the local one is not: admitted, then local limits apply
            assertThat(a.admit(caller, 0).allowed()).isTrue();
            assertThat(a.isUp()).isFalse();
            assertThat(meters.get("llm_gateway_budget_store_up").gauge().value()).isEqualTo(0.0);
            assertThat(a.admit(caller, 0).allowed()).isTrue();
            assertThat(a.admit(caller, 0).allowed()).isTrue();
            assertThat(a.admit(caller, 0).allowed()).isFalse();
        } finally {
            redis.start();
        }
        await(a::isUp);
        // a fresh Redis (no persistence here): shared again, through a second replica too
        RedisCallerBudgets b = replica();
        Caller other = caller("again", 2, 0);
        assertThat(a.admit(other, 0).allowed()).isTrue();
        assertThat(b.admit(other, 0).allowed()).isTrue();
        assertThat(a.admit(other, 0).allowed()).isFalse();
        assertThat(meters.get("llm_gateway_budget_store_up").gauge().value()).isEqualTo(1.0);
    }

    @Test
    void failClosedRefusesWhileRedisIsDown() throws Exception {
        RedisCallerBudgets a = replica(BudgetStoreProperties.WhenRedisDown.FAIL_CLOSED);
        Caller caller = caller("closed", 100, 0);
        assertThat(a.admit(caller, 0).allowed()).isTrue();
        redis.stop();
        try {
            assertThatThrownBy(() -> a.admitAsync(caller, 0).block(Duration.ofSeconds(5)))
                    .isInstanceOf(BudgetStoreUnavailableException.class);
            assertThat(a.isUp()).isFalse();
        } finally {
            redis.start();
        }
        await(a::isUp);
        assertThat(a.admit(caller, 0).allowed()).isTrue();
    }

    @Test
    void parsesTheScriptsAnswers() {
        assertThat(RedisCallerBudgets.decision("ok")).isEqualTo(CallerBudgets.Decision.ALLOWED);
        assertThat(RedisCallerBudgets.decision("tokens 12")).isEqualTo(CallerBudgets.Decision.refused("tokens", 12));
        assertThatThrownBy(() -> RedisCallerBudgets.decision("nonsense")).isInstanceOf(IllegalStateException.class);
    }

    static void await(java.util.function.BooleanSupplier condition) {
        long deadline = System.nanoTime() + Duration.ofSeconds(15).toNanos();
        while (!condition.getAsBoolean()) {
            if (System.nanoTime() > deadline) {
                throw new AssertionError("condition not reached in 15 s");
            }
            try {
                Thread.sleep(50);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new AssertionError(e);
            }
        }
    }
}
