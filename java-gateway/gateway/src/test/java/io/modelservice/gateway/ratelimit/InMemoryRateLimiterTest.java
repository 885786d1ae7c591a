package io.modelservice.gateway.ratelimit;

import java.util.Set;
import java.util.concurrent.atomic.AtomicLong;

import io.modelservice.gateway.auth.Caller;
import org.junit.jupiter.api.Test;

import static org.assertj.core.api.Assertions.assertThat;

class InMemoryRateLimiterTest {

    static final long SECOND = 1_000_000_000L;

    final AtomicLong now = new AtomicLong(1_000 * SECOND);
    final InMemoryRateLimiter limiter = new InMemoryRateLimiter(now::get);

    @Test
    void countsRequestsPerMinute() {
        Caller caller = new Caller("a", "api_key", Set.of(), 3, 0);
        for (int i = 0; i < 3; i++) {
            assertThat(limiter.admit(caller).allowed()).isTrue();
        }
        RateLimiter.Decision refused = limiter.admit(caller);
        assertThat(refused.allowed()).isFalse();
        assertThat(refused.limit()).isEqualTo("requests");
        assertThat(refused.retryAfterSeconds()).isEqualTo(20);  // one request refills every 60/3 s
        now.addAndGet(20 * SECOND);
        assertThat(limiter.admit(caller).allowed()).isTrue();
    }

    @Test
    void debitsRealTokenUsageAndRefusesWhileOverdrawn() {
        Caller caller = new Caller("b", "api_key", Set.of(), 0, 60);  // 1 token per second
        assertThat(limiter.admit(caller).allowed()).isTrue();
        limiter.debitTokens(caller, 50);
        assertThat(limiter.admit(caller).allowed()).isTrue();  // 10 left: still admitted
        limiter.debitTokens(caller, 40);                       // overdrawn: -30
        RateLimiter.Decision refused = limiter.admit(caller);
        assertThat(refused.allowed()).isFalse();
        assertThat(refused.limit()).isEqualTo("tokens");
        assertThat(refused.retryAfterSeconds()).isEqualTo(31);
        assertThat(limiter.level(caller, "tokens")).isEqualTo(-30.0);
        now.addAndGet(31 * SECOND);
        assertThat(limiter.admit(caller).allowed()).isTrue();
    }

    @Test
    void refillsUpToTheLimitOnly() {
        Caller caller = new Caller("c", "api_key", Set.of(), 0, 120);
        limiter.debitTokens(caller, 100);
        now.addAndGet(3600 * SECOND);
        assertThat(limiter.level(caller, "tokens")).isEqualTo(120.0);
    }

    @Test
    void aTokenRefusalDoesNotSpendARequest() {
        Caller caller = new Caller("d", "api_key", Set.of(), 2, 10);
        limiter.debitTokens(caller, 20);
        assertThat(limiter.admit(caller).limit()).isEqualTo("tokens");
        assertThat(limiter.level(caller, "requests")).isEqualTo(2.0);
    }

    @Test
    void zeroMeansUnlimitedAndCallersAreIndependent() {
        Caller free = new Caller("e", "api_key", Set.of(), 0, 0);
        for (int i = 0; i < 1000; i++) {
            assertThat(limiter.admit(free).allowed()).isTrue();
            limiter.debitTokens(free, 1_000_000);
        }
        Caller one = new Caller("f", "api_key", Set.of(), 1, 0);
        Caller sameNameOtherMethod = new Caller("f", "jwt", Set.of(), 1, 0);
        assertThat(limiter.admit(one).allowed()).isTrue();
        assertThat(limiter.admit(one).allowed()).isFalse();
        assertThat(limiter.admit(sameNameOtherMethod).allowed()).isTrue();
    }
}
