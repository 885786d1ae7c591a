package io.modelservice.gateway;

import io.modelservice.gateway.config.GatewayProperties;
import io.modelservice.gateway.route.FailoverLoadBalancerConfiguration;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.context.properties.EnableConfigurationProperties;
import org.springframework.cloud.loadbalancer.annotation.LoadBalancerClients;

/** The edge of the LLM model service: auth, limits, resilience, discovery through Nacos. */
@SpringBootApplication
@EnableConfigurationProperties(GatewayProperties.class)
@LoadBalancerClients(defaultConfiguration = FailoverLoadBalancerConfiguration.class)
public class GatewayApplication {

    public static void main(String[] args) {
        SpringApplication.run(GatewayApplication.class, args);
    }
}
