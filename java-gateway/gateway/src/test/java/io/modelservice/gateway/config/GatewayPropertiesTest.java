package io.modelservice.gateway.config;

import java.time.Duration;
import java.util.List;

import org.junit.jupiter.api.Test;
import org.springframework.boot.autoconfigure.AutoConfigurations;
import org.springframework.boot.autoconfigure.validation.ValidationAutoConfiguration;
import org.springframework.boot.context.properties.EnableConfigurationProperties;
import org.springframework.boot.test.context.runner.ApplicationContextRunner;
import org.springframework.context.annotation.Configuration;

import static org.assertj.core.api.Assertions.assertThat;

/** The records bind through their constructors, with their defaults, and are still validated at startup. */
class GatewayPropertiesTest {

    @Configuration(proxyBeanMethods = false)
    @EnableConfigurationProperties(GatewayProperties.class)
    static class Bound {
    }

    final ApplicationContextRunner context = new ApplicationContextRunner()
            .withConfiguration(AutoConfigurations.of(ValidationAutoConfiguration.class))
            .withUserConfiguration(Bound.class);

    @Test
    void defaultsWithoutAnyProperty() {
        context.run(c -> {
            GatewayProperties p = c.getBean(GatewayProperties.class);
            assertThat(p.routes()).singleElement().satisfies(route -> {
                assertThat(route.id()).isEqualTo("model-service");
                assertThat(route.service()).isEqualTo("model-service");
                assertThat(route.responseTimeout()).isEqualTo(Duration.ofSeconds(300));
            });
            assertThat(p.resilience().failureStatuses()).containsExactly(502, 503, 504);
            assertThat(p.resilience().refusalStatuses()).containsExactly(429);
            assertThat(p.resilience().retryMethods()).containsExactly("GET", "POST");
            assertThat(p.upstream().allowedNetworks()).containsExactly("127.0.0.0/8", "::1/128");
            assertThat(p.maxBodySize().toBytes()).isEqualTo(1024 * 1024);
            assertThat(p.jwt().enabled()).isFalse();
            assertThat(p.apiKeys()).isEmpty();
        });
    }

    @Test
    void bindsListsAndNestedRecords() {
        context.withPropertyValues("llm-gateway.api-keys[0].name=team-a", "llm-gateway.api-keys[0].sha256=" + "a".repeat(64),
                "llm-gateway.routes[0].id=big", "llm-gateway.routes[0].service=big-service",
                "llm-gateway.routes[0].models=m1,m2", "llm-gateway.resilience.refusal-statuses=429,503").run(c -> {
            GatewayProperties p = c.getBean(GatewayProperties.class);
            assertThat(p.apiKeys()).singleElement().satisfies(key -> {
                assertThat(key.name()).isEqualTo("team-a");
                assertThat(key.tokensPerMinute()).isEqualTo(20_000);
            });
            assertThat(p.routes()).singleElement().satisfies(route -> {
                assertThat(route.models()).isEqualTo(List.of("m1", "m2"));
                assertThat(route.connectTimeout()).isEqualTo(Duration.ofSeconds(2));
            });
            assertThat(p.resilience().refusalStatuses()).containsExactly(429, 503);
        });
    }

    @Test
    void refusesToStartOnInvalidValues() {
        context.withPropertyValues("llm-gateway.api-keys[0].name=team-a", "llm-gateway.api-keys[0].sha256=not-a-hash")
                .run(c -> assertThat(c).hasFailed());
        context.withPropertyValues("llm-gateway.budget.prompt-bytes-per-token=0")
                .run(c -> assertThat(c).hasFailed());
    }
}
