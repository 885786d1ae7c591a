package io.modelservice.gateway.web;

import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

import static org.assertj.core.api.Assertions.assertThat;

class CanonicalPathFilterTest {

    @ParameterizedTest
    @ValueSource(strings = {"/v1/chat/completions", "/v1/models", "/v1/models/smollm2-135m-instruct", "/", "",
            "/v1/models/org.model-v1.5_q4"})
    void acceptsPathsInTheirNormalForm(String path) {
        assertThat(CanonicalPathFilter.isCanonical(path)).isTrue();
    }

    @ParameterizedTest
    @ValueSource(strings = {"/%761/chat/completions", "/v1/chat%2Fcompletions", "/v1;x/chat/completions",
            "/__gateway;x/via/model-service", "/%5f_gateway/via/model-service", "/v1//chat/completions",
            "/v1/./models", "/v1/../__gateway/via/x", "/v1/models/..", "/v1\\models", "v1/models"})
    void refusesEverythingElse(String path) {
        assertThat(CanonicalPathFilter.isCanonical(path)).isFalse();
    }
}
