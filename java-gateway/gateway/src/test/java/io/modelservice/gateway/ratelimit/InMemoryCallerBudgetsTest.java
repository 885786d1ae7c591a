package io.modelservice.gateway.ratelimit;

import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicLong;

import io.modelservice.gateway.auth.Caller;
import org.junit.jupiter.api.Test;

import static org.assertj.core.api.Assertions.assertThat;

class InMemoryCallerBudgetsTest {

    static final long SECOND = 1_000_000_000L;

    final AtomicLong now = new AtomicLong(1_000 * SECOND);
    final InMemoryCallerBudgets budgets = new InMemoryCallerBudgets(now::get);

    @Test
    void countsRequestsPerMinute() {
        Caller caller = new Caller("a", "api_key", Set.of(), 3, 0);
        for (int i = 0; i < 3; i++) {
            assertThat(budgets.admit(caller, 0).allowed()).isTrue();
        }
        CallerBudgets.Decision refused = budgets.admit(caller, 0);
        assertThat(refused.allowed()).isFalse();
        assertThat(refused.limit()).isEqualTo("requests");
        assertThat(refused.retryAfterSeconds()).isEqualTo(20);  // one request refills every 60/3 s
        now.addAndGet(20 * SECOND);
        assertThat(budgets.admit(caller, 0).allowed()).isTrue();
    }

    @Test
    void reservesOnAdmissionAndSettlesToTheRealUsage() {
        Caller caller = new Caller("b", "api_key", Set.of(), 0, 60);  // 1 token per second
        assertThat(budgets.admit(caller, 50).allowed()).isTrue();
        assertThat(budgets.level(caller, "tokens")).isEqualTo(10.0);
        budgets.settle(caller, 50, 20);                          // used less: 30 come back
        assertThat(budgets.level(caller, "tokens")).isEqualTo(40.0);
        assertThat(budgets.admit(caller, 30).allowed()).isTrue();   // 10 left: still admitted
        budgets.settle(caller, 30, 70);                          // used more: overdrawn to -30
        CallerBudgets.Decision refused = budgets.admit(caller, 1);
        assertThat(refused.allowed()).isFalse();
        assertThat(refused.limit()).isEqualTo("tokens");
        assertThat(refused.retryAfterSeconds()).isEqualTo(31);
        assertThat(budgets.level(caller, "tokens")).isEqualTo(-30.0);
        now.addAndGet(31 * SECOND);
        assertThat(budgets.admit(caller, 1).allowed()).isTrue();
    }

    @Test
    void aParallelBurstOvershootsByAtMostOneReservation() throws Exception {
        Caller caller = new Caller("burst", "api_key", Set.of(), 0, 300);
        int threads = 20;
        long reservation = 53;
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        CountDownLatch start = new CountDownLatch(1);
        List<Future<Boolean>> results = new ArrayList<>();
        for (int i = 0; i < threads; i++) {
            results.add(pool.submit(() -> {
                start.await();
                return budgets.admit(caller, reservation).allowed();
            }));
        }
        start.countDown();
        int admitted = 0;
        for (Future<Boolean> r : results) {
            admitted += r.get() ? 1 : 0;
        }
        pool.shutdown();
        // 300 / 53 = 5.66: five fit, the sixth is admitted while the budget is still positive, no more
        assertThat(admitted).isEqualTo(6);
        assertThat(admitted * reservation).isLessThanOrEqualTo(300 + reservation);
    }

    @Test
    void settlementNeverRefillsAboveTheLimit() {
        Caller caller = new Caller("c", "api_key", Set.of(), 0, 120);
        assertThat(budgets.admit(caller, 100).allowed()).isTrue();
        now.addAndGet(3600 * SECOND);
        budgets.settle(caller, 100, 0);
        assertThat(budgets.level(caller, "tokens")).isEqualTo(120.0);
    }

    @Test
    void aRefusalTakesNothing() {
        Caller caller = new Caller("d", "api_key", Set.of(), 2, 10);
        assertThat(budgets.admit(caller, 30).allowed()).isTrue();  // -20 tokens, 1 request left
        assertThat(budgets.admit(caller, 5).limit()).isEqualTo("tokens");
        assertThat(budgets.level(caller, "requests")).isEqualTo(1.0);
        assertThat(budgets.level(caller, "tokens")).isEqualTo(-20.0);

        Caller few = new Caller("d2", "api_key", Set.of(), 1, 1000);
        assertThat(budgets.admit(few, 10).allowed()).isTrue();
        assertThat(budgets.admit(few, 10).limit()).isEqualTo("requests");
        assertThat(budgets.level(few, "tokens")).isEqualTo(990.0);  // the refused request's reservation came back
    }

    @Test
    void zeroMeansUnlimitedAndCallersAreIndependent() {
        Caller free = new Caller("e", "api_key", Set.of(), 0, 0);
        for (int i = 0; i < 1000; i++) {
            assertThat(budgets.admit(free, 1_000_000).allowed()).isTrue();
            budgets.settle(free, 1_000_000, 2_000_000);
        }
        Caller one = new Caller("f", "api_key", Set.of(), 1, 0);
        Caller sameNameOtherMethod = new Caller("f", "jwt", Set.of(), 1, 0);
        assertThat(budgets.admit(one, 0).allowed()).isTrue();
        assertThat(budgets.admit(one, 0).allowed()).isFalse();
        assertThat(budgets.admit(sameNameOtherMethod, 0).allowed()).isTrue();
    }
}
