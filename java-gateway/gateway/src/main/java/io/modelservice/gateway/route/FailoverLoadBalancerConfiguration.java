package io.modelservice.gateway.route;

import org.springframework.cloud.client.ServiceInstance;
import org.springframework.cloud.loadbalancer.core.ReactorLoadBalancer;
import org.springframework.cloud.loadbalancer.core.ServiceInstanceListSupplier;
import org.springframework.cloud.loadbalancer.support.LoadBalancerClientFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.core.env.Environment;

/**
 * The load balancer of every service (set by {@code @LoadBalancerClients(defaultConfiguration = ...)}); lives in
 * each service's child context, so it is deliberately not a {@code @Configuration} picked up by component scan.
 */
public class FailoverLoadBalancerConfiguration {

    @Bean
    public ReactorLoadBalancer<ServiceInstance> failoverLoadBalancer(Environment environment,
                                                                     LoadBalancerClientFactory factory,
                                                                     InstanceBreakers breakers,
                                                                     UpstreamAllowlist allowlist,
                                                                     PodLoads loads) {
        String name = environment.getProperty(LoadBalancerClientFactory.PROPERTY_NAME);
        return new FailoverLoadBalancer(factory.getLazyProvider(name, ServiceInstanceListSupplier.class), name,
                breakers, allowlist, loads);
    }
}
