package io.modelservice.gateway.route;

import java.net.URI;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.LongSupplier;

import io.micrometer.core.instrument.Counter;
import io.micrometer.core.instrument.Gauge;
import io.micrometer.core.instrument.Meter;
import io.micrometer.core.instrument.MeterRegistry;
import io.netty.channel.ChannelOption;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.DisposableBean;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.boot.context.properties.EnableConfigurationProperties;
import org.springframework.cloud.client.ServiceInstance;
import org.springframework.http.client.reactive.ReactorClientHttpConnector;
import org.springframework.stereotype.Component;
import org.springframework.web.reactive.function.client.WebClient;
import reactor.core.Disposable;
import reactor.core.publisher.Flux;
import reactor.core.publisher.Mono;
import reactor.netty.http.client.HttpClient;
import reactor.netty.resources.ConnectionProvider;

/**
 * The load of each model-service instance, for the load balancer's {@code least-loaded} choice:
 * <ul>
 *   <li>the pod's own numbers: {@code model_service_num_requests_running} and {@code _waiting} from its
 *   {@code /metrics}, scraped in the background every {@code scrape-interval} (one scrape at a time per pod, never
 *   on a request's path; only pods the load balancer listed, so only pods inside the allowed networks, and without
 *   any credential: the pods' metrics need none);</li>
 *   <li>this gateway's attempts in flight to each pod, from the moment it is picked until its answer ends; those
 *   started since the last scrape are added to the pod's numbers (which cannot show them yet).</li>
 * </ul>
 * Score = running + waiting (less this gateway's attempts that have ended since the scrape) + its attempts started
 * since the scrape and still in flight. Only requests that take a place in a pod's batch count (POST: chat and
 * completions), not {@code GET /v1/models}. An instance without fresh numbers (its metrics do
 * not answer) stays routable: it is scored as the mean of the fresh ones plus its own attempts in flight. With no
 * fresh numbers at all the choice is round robin, as before. Pods whose batch and queue are full (score &ge; their
 * registered max_running_requests + max_waiting_requests) are skipped unless all are.
 * Visible in {@code llm_gateway_instance_load{instance,kind}} and {@code llm_gateway_lb_picks_total{instance,reason}}.
 */
@Component
@EnableConfigurationProperties(LoadBalancerProperties.class)
public class PodLoads implements DisposableBean {

    private static final Logger log = LoggerFactory.getLogger(PodLoads.class);
    static final String RUNNING = "model_service_num_requests_running";
    static final String WAITING = "model_service_num_requests_waiting";

    private final LoadBalancerProperties properties;
    private final MeterRegistry meters;
    private final LongSupplier nanoClock;
    private final Map<String, Pod> pods = new ConcurrentHashMap<>();
    private final WebClient web;
    private final ConnectionProvider connections;
    private final Disposable scraper;

    @Autowired
    public PodLoads(LoadBalancerProperties properties, MeterRegistry meters) {
        this(properties, meters, System::nanoTime, true);
    }

    PodLoads(LoadBalancerProperties properties, MeterRegistry meters, LongSupplier nanoClock, boolean scrape) {
        this.properties = properties;
        this.meters = meters;
        this.nanoClock = nanoClock;
        this.connections = ConnectionProvider.builder("pod-metrics").maxConnections(64).build();
        this.web = WebClient.builder().clientConnector(new ReactorClientHttpConnector(HttpClient.create(connections)
                        .option(ChannelOption.CONNECT_TIMEOUT_MILLIS, (int) properties.scrapeTimeout().toMillis())
                        .responseTimeout(properties.scrapeTimeout())))
                .codecs(c -> c.defaultCodecs().maxInMemorySize(1024 * 1024))
                .build();
        boolean on = scrape && properties.strategy() == LoadBalancerProperties.Strategy.LEAST_LOADED;
        this.scraper = on ? Flux.interval(properties.scrapeInterval())
                .onBackpressureDrop()
                .subscribe(tick -> scrapeAll()) : null;
    }

    // ------------------------------------------------------------------------------------------- what is known
    /** One pod's numbers, as scraped (taken when the scrape started), and how many of this gateway's attempts that
     *  they included have ended since. */
    record Sample(double running, double waiting, long startedNanos, AtomicInteger endedSince) {

        Sample(double running, double waiting, long startedNanos) {
            this(running, waiting, startedNanos, new AtomicInteger());
        }

        /** The pod's numbers now, as far as this gateway knows: without its attempts that have ended since. */
        double queue() {
            return Math.max(0, running + waiting - endedSince.get());
        }
    }

    /** One attempt in flight to a pod (identity matters: two attempts may start in the same nanosecond). */
    public static final class Attempt {
        final Pod pod;
        final long startedNanos;
        final AtomicBoolean ended = new AtomicBoolean();

        Attempt(Pod pod, long startedNanos) {
            this.pod = pod;
            this.startedNanos = startedNanos;
        }
    }

    static final class Pod {
        final String key;
        final URI metrics;
        volatile long maxRequests = -1;  // max_running_requests + max_waiting_requests from Nacos, -1 unknown
        volatile long lastListedNanos;
        volatile Sample sample;
        final Set<Attempt> inFlight = ConcurrentHashMap.newKeySet();
        final AtomicBoolean scraping = new AtomicBoolean();
        final List<Meter> gauges = new ArrayList<>();

        Pod(String key, URI metrics) {
            this.key = key;
            this.metrics = metrics;
        }

        int startedSince(long nanos) {
            int n = 0;
            for (Attempt a : inFlight) {
                if (a.startedNanos - nanos >= 0) {
                    n++;
                }
            }
            return n;
        }
    }

    /** Records the instances the load balancer may use now (the allowed ones), so that they are scraped. */
    public void listed(List<ServiceInstance> instances) {
        long now = nanoClock.getAsLong();
        for (ServiceInstance instance : instances) {
            Pod pod = pods.computeIfAbsent(InstanceBreakers.key(instance), key -> register(key, instance));
            pod.lastListedNanos = now;
            pod.maxRequests = capacity(instance.getMetadata());
        }
    }

    private Pod register(String key, ServiceInstance instance) {
        URI base = instance.getUri() != null ? instance.getUri()
                : URI.create("http://" + instance.getHost() + ":" + instance.getPort());
        Pod pod = new Pod(key, URI.create(base.getScheme() + "://" + base.getRawAuthority()
                + properties.metricsPath()));
        pod.lastListedNanos = nanoClock.getAsLong();
        String description = "Load of a model-service instance as the load balancer sees it: the pod's running and "
                + "waiting requests (scraped), this gateway's attempts in flight, the resulting score";
        pod.gauges.add(gauge("running", pod, p -> p.sample == null ? Double.NaN : p.sample.running(), description));
        pod.gauges.add(gauge("waiting", pod, p -> p.sample == null ? Double.NaN : p.sample.waiting(), description));
        pod.gauges.add(gauge("in_flight", pod, p -> p.inFlight.size(), description));
        pod.gauges.add(gauge("score", pod, p -> {
            Sample s = p.sample;
            return fresh(s) ? s.queue() + p.startedSince(s.startedNanos()) : Double.NaN;
        }, description));
        return pod;
    }

    private Meter gauge(String kind, Pod pod, java.util.function.ToDoubleFunction<Pod> value, String description) {
        return Gauge.builder("llm_gateway_instance_load", pod, value).description(description)
                .tag("instance", pod.key).tag("kind", kind).register(meters);
    }

    static long capacity(Map<String, String> metadata) {
        try {
            return Long.parseLong(metadata.getOrDefault("max_running_requests", ""))
                    + Long.parseLong(metadata.getOrDefault("max_waiting_requests", ""));
        } catch (NumberFormatException e) {
            return -1;
        }
    }

    boolean fresh(Sample sample) {
        return sample != null && nanoClock.getAsLong() - sample.startedNanos() <= properties.staleAfter().toNanos();
    }

    /** An attempt on this instance starts (the load balancer picked it); end it with {@link #ended}. */
    public Attempt started(ServiceInstance instance) {
        Pod pod = pods.computeIfAbsent(InstanceBreakers.key(instance), key -> register(key, instance));
        Attempt attempt = new Attempt(pod, nanoClock.getAsLong());
        pod.inFlight.add(attempt);
        return attempt;
    }

    public void ended(Attempt attempt) {
        if (attempt.ended.compareAndSet(false, true)) {
            attempt.pod.inFlight.remove(attempt);
            Sample s = attempt.pod.sample;
            if (s != null && s.startedNanos() - attempt.startedNanos > 0) {
                s.endedSince().incrementAndGet();  // the pod's numbers still count it until the next scrape
            }
        }
    }

    // ------------------------------------------------------------------------------------------- the choice
    /** The outcome of {@link #choose}: the index in the candidates, and why ({@code least_loaded},
     *  {@code round_robin}: no fresh numbers, {@code all_full}: every pod full, least loaded among them). */
    record Choice(int index, String reason) {
    }

    /** Picks among {@code candidates} (healthy, allowed, untried first: the balancer's list); {@code turn} breaks
     *  ties in turn (and is the round robin). */
    Choice choose(List<ServiceInstance> candidates, int turn) {
        int n = candidates.size();
        if (properties.strategy() == LoadBalancerProperties.Strategy.ROUND_ROBIN || n == 1) {
            return record(candidates, new Choice(Math.floorMod(turn, n), "round_robin"));
        }
        double[] score = new double[n];
        boolean[] isFresh = new boolean[n];
        double freshSum = 0;
        int freshCount = 0;
        for (int i = 0; i < n; i++) {
            Pod pod = pods.get(InstanceBreakers.key(candidates.get(i)));
            Sample s = pod == null ? null : pod.sample;
            if (fresh(s)) {
                isFresh[i] = true;
                score[i] = s.queue() + pod.startedSince(s.startedNanos());
                freshSum += score[i];
                freshCount++;
            }
        }
        if (freshCount == 0) {
            return record(candidates, new Choice(Math.floorMod(turn, n), "round_robin"));
        }
        double mean = freshSum / freshCount;
        boolean[] full = new boolean[n];
        boolean anyRoom = false;
        for (int i = 0; i < n; i++) {
            Pod pod = pods.get(InstanceBreakers.key(candidates.get(i)));
            if (!isFresh[i]) {
                score[i] = mean + (pod == null ? 0 : pod.inFlight.size());
            }
            full[i] = properties.skipFull() && isFresh[i] && pod.maxRequests >= 0 && score[i] >= pod.maxRequests;
            anyRoom |= !full[i];
        }
        double best = Double.POSITIVE_INFINITY;
        List<Integer> ties = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            if (anyRoom && full[i]) {
                continue;
            }
            if (score[i] < best) {
                best = score[i];
                ties.clear();
            }
            if (score[i] == best) {
                ties.add(i);
            }
        }
        int index = ties.get(Math.floorMod(turn, ties.size()));
        if (log.isDebugEnabled()) {
            log.atDebug().addKeyValue("instance", InstanceBreakers.key(candidates.get(index)))
                    .addKeyValue("score", best).addKeyValue("candidates", n).log("least-loaded pick");
        }
        return record(candidates, new Choice(index, anyRoom ? "least_loaded" : "all_full"));
    }

    private Choice record(List<ServiceInstance> candidates, Choice choice) {
        Counter.builder("llm_gateway_lb_picks").description("Instances picked by the load balancer, and why")
                .tag("instance", InstanceBreakers.key(candidates.get(choice.index()))).tag("reason", choice.reason())
                .register(meters).increment();
        return choice;
    }

    // ------------------------------------------------------------------------------------------- the scrape
    private void scrapeAll() {
        long now = nanoClock.getAsLong();
        for (Pod pod : pods.values()) {
            if (now - pod.lastListedNanos > properties.forgetAfter().toNanos() && pod.inFlight.isEmpty()) {
                forget(pod);
            } else if (pod.scraping.compareAndSet(false, true)) {
                scrape(pod).doFinally(s -> pod.scraping.set(false)).subscribe();
            }
        }
    }

    Mono<Void> scrape(Pod pod) {
        long started = nanoClock.getAsLong();
        return web.get().uri(pod.metrics).retrieve().bodyToMono(String.class)
                .timeout(properties.scrapeTimeout())
                .doOnNext(text -> {
                    double[] numbers = parse(text);
                    if (numbers != null) {
                        pod.sample = new Sample(numbers[0], numbers[1], started);
                    }
                })
                .onErrorResume(e -> {
                    log.atDebug().addKeyValue("instance", pod.key).addKeyValue("error", e.toString())
                            .log("pod metrics scrape failed");
                    return Mono.empty();
                })
                .then();
    }

    private void forget(Pod pod) {
        pods.remove(pod.key, pod);
        pod.gauges.forEach(meters::remove);
    }

    /** running and waiting from a Prometheus text page (summed over label sets), or null when either is absent. */
    static double[] parse(String text) {
        double running = Double.NaN;
        double waiting = Double.NaN;
        for (String line : text.split("\n")) {
            if (line.startsWith(RUNNING)) {
                running = add(running, value(line, RUNNING));
            } else if (line.startsWith(WAITING)) {
                waiting = add(waiting, value(line, WAITING));
            }
        }
        return Double.isNaN(running) || Double.isNaN(waiting) ? null : new double[] {running, waiting};
    }

    private static double add(double sum, double value) {
        if (Double.isNaN(value)) {
            return sum;
        }
        return Double.isNaN(sum) ? value : sum + value;
    }

    /** The sample value of a line of exactly this metric ("name 3.0" or "name{labels} 3.0"), else NaN. */
    private static double value(String line, String name) {
        String rest = line.substring(name.length());
        if (rest.startsWith("{")) {
            int close = rest.lastIndexOf('}');
            if (close < 0) {
                return Double.NaN;
            }
            rest = rest.substring(close + 1);
        } else if (!rest.startsWith(" ")) {
            return Double.NaN;  // another metric with this prefix
        }
        String[] parts = rest.trim().split("\\s+");
        try {
            return Double.parseDouble(parts[0]);
        } catch (NumberFormatException | ArrayIndexOutOfBoundsException e) {
            return Double.NaN;
        }
    }

    @Override
    public void destroy() {
        if (scraper != null) {
            scraper.dispose();
        }
        connections.dispose();
    }
}
