package io.modelservice.gateway.ratelimit;

import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.function.LongSupplier;

import io.modelservice.gateway.auth.Caller;

/**
 * Token buckets in this process: each budget refills continuously at (limit / 60) per second up to the limit.
 * The token bucket goes negative when a reservation or a settlement exceeds what is left; it admits again once it
 * has refilled above zero.
 */
public class InMemoryCallerBudgets implements CallerBudgets {

    private static final long NANOS_PER_SECOND = 1_000_000_000L;

    private final LongSupplier nanoClock;
    private final Map<String, Bucket> buckets = new ConcurrentHashMap<>();

    public InMemoryCallerBudgets() {
        this(System::nanoTime);
    }

    public InMemoryCallerBudgets(LongSupplier nanoClock) {
        this.nanoClock = nanoClock;
    }

    @Override
    public Decision admit(Caller caller, long reservedTokens) {
        long now = nanoClock.getAsLong();
        Bucket tokens = caller.tokensPerMinute() > 0 ? bucket(caller, "tokens", caller.tokensPerMinute(), now) : null;
        Bucket requests = caller.requestsPerMinute() > 0
                ? bucket(caller, "requests", caller.requestsPerMinute(), now) : null;
        if (tokens != null) {
            // check and reserve in one step, so that parallel admissions see each other's reservations
            long wait = tokens.reserveIfPositive(Math.max(0, reservedTokens), now);
            if (wait > 0) {
                return Decision.refused("tokens", wait);
            }
        }
        if (requests != null) {
            long wait = requests.tryTake(1, now);
            if (wait > 0) {
                if (tokens != null) {
                    tokens.add(Math.max(0, reservedTokens), now);  // not admitted: give the reservation back
                }
                return Decision.refused("requests", wait);
            }
        }
        return Decision.ALLOWED;
    }

    @Override
    public void settle(Caller caller, long reservedTokens, long usedTokens) {
        if (caller.tokensPerMinute() <= 0 || reservedTokens == usedTokens) {
            return;
        }
        long now = nanoClock.getAsLong();
        bucket(caller, "tokens", caller.tokensPerMinute(), now).add(reservedTokens - usedTokens, now);
    }

    /** The current level of a caller's budget (for tests and diagnostics). */
    public double level(Caller caller, String limit) {
        Bucket bucket = buckets.get(caller.limitKey() + "|" + limit);
        if (bucket == null) {
            return limit.equals("tokens") ? caller.tokensPerMinute() : caller.requestsPerMinute();
        }
        synchronized (bucket) {
            bucket.refill(nanoClock.getAsLong());
            return bucket.level;
        }
    }

    private Bucket bucket(Caller caller, String limit, long perMinute, long now) {
        return buckets.computeIfAbsent(caller.limitKey() + "|" + limit, k -> new Bucket(perMinute, now));
    }

    static final class Bucket {
        final double capacity;
        final double perNano;
        double level;
        long updated;

        Bucket(long perMinute, long now) {
            this.capacity = perMinute;
            this.perNano = perMinute / 60.0 / NANOS_PER_SECOND;
            this.level = perMinute;
            this.updated = now;
        }

        void refill(long now) {
            if (now > updated) {
                level = Math.min(capacity, level + (now - updated) * perNano);
                updated = now;
            }
        }

        /** Takes n if available; otherwise takes nothing and returns the seconds to wait (0 when taken). */
        synchronized long tryTake(double n, long now) {
            refill(now);
            if (level >= n) {
                level -= n;
                return 0;
            }
            return secondsFor(n - level);
        }

        /** Takes n (possibly going negative) if the level is above zero; otherwise the seconds until it is. */
        synchronized long reserveIfPositive(double n, long now) {
            refill(now);
            if (level > 0) {
                level -= n;
                return 0;
            }
            return secondsFor(-level + 1e-9);
        }

        /** Adds n (negative: takes), never above the capacity. */
        synchronized void add(double n, long now) {
            refill(now);
            level = Math.min(capacity, level + n);
        }

        private long secondsFor(double missing) {
            return Math.max(1, (long) Math.ceil(missing / perNano / NANOS_PER_SECOND));
        }
    }
}
