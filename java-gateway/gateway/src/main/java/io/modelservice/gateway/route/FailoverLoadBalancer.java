package io.modelservice.gateway.route;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.atomic.AtomicInteger;

import io.modelservice.gateway.web.GatewayAttributes;
import org.springframework.beans.factory.ObjectProvider;
import org.springframework.cloud.client.ServiceInstance;
import org.springframework.cloud.client.loadbalancer.DefaultResponse;
import org.springframework.cloud.client.loadbalancer.EmptyResponse;
import org.springframework.cloud.client.loadbalancer.Request;
import org.springframework.cloud.client.loadbalancer.RequestDataContext;
import org.springframework.cloud.client.loadbalancer.Response;
import org.springframework.cloud.loadbalancer.core.NoopServiceInstanceListSupplier;
import org.springframework.cloud.loadbalancer.core.ReactorServiceInstanceLoadBalancer;
import org.springframework.cloud.loadbalancer.core.ServiceInstanceListSupplier;
import reactor.core.publisher.Mono;

/**
 * Picks among the healthy instances Nacos lists, after (1) ignoring instances outside the allowed networks
 * (anyone who can write to Nacos can register one), (2) skipping instances whose circuit breaker is open and
 * (3) on a retry preferring an instance this request has not tried yet, so a retry goes to another pod; then the
 * least loaded of those ({@link PodLoads}: the pods' own queue numbers and this gateway's attempts in flight), or
 * round robin ({@code llm-gateway.load-balancer.strategy}, or while no pod's numbers are fresh).
 */
public class FailoverLoadBalancer implements ReactorServiceInstanceLoadBalancer {

    private final ObjectProvider<ServiceInstanceListSupplier> suppliers;
    private final String serviceId;
    private final InstanceBreakers breakers;
    private final UpstreamAllowlist allowlist;
    private final PodLoads loads;
    private final AtomicInteger position = new AtomicInteger(ThreadLocalRandom.current().nextInt(1000));

    public FailoverLoadBalancer(ObjectProvider<ServiceInstanceListSupplier> suppliers, String serviceId,
                                InstanceBreakers breakers, UpstreamAllowlist allowlist, PodLoads loads) {
        this.suppliers = suppliers;
        this.serviceId = serviceId;
        this.breakers = breakers;
        this.allowlist = allowlist;
        this.loads = loads;
    }

    @Override
    public Mono<Response<ServiceInstance>> choose(Request request) {
        ServiceInstanceListSupplier supplier = suppliers.getIfAvailable(NoopServiceInstanceListSupplier::new);
        Set<?> tried = triedInstances(request);
        boolean generation = isGeneration(request);
        return supplier.get(request).next().map(instances -> pick(instances, tried, generation));
    }

    Response<ServiceInstance> pick(List<ServiceInstance> instances, Set<?> tried, boolean generation) {
        List<ServiceInstance> allowed = new ArrayList<>();
        List<ServiceInstance> admitted = new ArrayList<>();
        for (ServiceInstance instance : instances) {
            if (allowlist.admits(instance)) {
                allowed.add(instance);
                if (breakers.admits(instance)) {
                    admitted.add(instance);
                }
            }
        }
        loads.listed(allowed);  // scraped from now on: never an instance outside the allowed networks
        if (admitted.isEmpty()) {
            return new EmptyResponse();
        }
        List<ServiceInstance> fresh = new ArrayList<>();
        for (ServiceInstance instance : admitted) {
            if (!tried.contains(InstanceBreakers.key(instance))) {
                fresh.add(instance);
            }
        }
        List<ServiceInstance> candidates = fresh.isEmpty() ? admitted : fresh;
        int turn = position.getAndIncrement();
        // only generation requests take a place in a pod's batch; the rest (GET /v1/models) go round robin
        int index = generation ? loads.choose(candidates, turn).index() : Math.floorMod(turn, candidates.size());
        return new DefaultResponse(candidates.get(index));
    }

    /** A POST (chat, completions): the requests that wait in a pod's queue. */
    private static boolean isGeneration(Request request) {
        return request != null && request.getContext() instanceof RequestDataContext context
                && context.getClientRequest() != null
                && context.getClientRequest().getHttpMethod() == org.springframework.http.HttpMethod.POST;
    }

    private static Set<?> triedInstances(Request request) {
        if (request != null && request.getContext() instanceof RequestDataContext context
                && context.getClientRequest() != null) {
            Map<String, Object> attributes = context.getClientRequest().getAttributes();
            if (attributes != null && attributes.get(GatewayAttributes.TRIED_INSTANCES) instanceof Set<?> set) {
                return set;
            }
        }
        return Set.of();
    }

    @Override
    public String toString() {
        return "FailoverLoadBalancer[" + serviceId + "]";
    }
}
