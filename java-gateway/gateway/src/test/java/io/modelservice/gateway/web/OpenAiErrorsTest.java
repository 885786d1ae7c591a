package io.modelservice.gateway.web;

import java.util.Map;

import com.fasterxml.jackson.databind.ObjectMapper;
import io.micrometer.core.instrument.simple.SimpleMeterRegistry;
import org.junit.jupiter.api.Test;
import org.springframework.mock.http.server.reactive.MockServerHttpRequest;
import org.springframework.mock.web.server.MockServerWebExchange;

import static org.assertj.core.api.Assertions.assertThat;

class OpenAiErrorsTest {

    final OpenAiErrors errors = new OpenAiErrors(new ObjectMapper(), new GatewayMetrics(new SimpleMeterRegistry()));

    @Test
    @SuppressWarnings("unchecked")
    void hasOpenAisShapeWithAllFourFields() throws Exception {
        byte[] body = errors.body(OpenAiErrors.unauthorized("Incorrect API key provided."));
        Map<String, Object> parsed = new ObjectMapper().readValue(body, Map.class);
        Map<String, Object> error = (Map<String, Object>) parsed.get("error");
        assertThat(parsed).containsOnlyKeys("error");
        assertThat(error).containsOnlyKeys("message", "type", "param", "code");
        assertThat(error).containsEntry("type", "invalid_request_error").containsEntry("code", "invalid_api_key")
                .containsEntry("param", null);
    }

    @Test
    void writesStatusHeadersAndBody() {
        MockServerWebExchange exchange = MockServerWebExchange.from(MockServerHttpRequest.post("/v1/chat/completions"));
        errors.write(exchange, new OpenAiErrors.ApiError(429, "slow down", "tokens", null,
                "rate_limit_exceeded", 12)).block();
        assertThat(exchange.getResponse().getStatusCode().value()).isEqualTo(429);
        assertThat(exchange.getResponse().getHeaders().getFirst("Retry-After")).isEqualTo("12");
        assertThat(exchange.getResponse().getHeaders().getContentType().toString()).isEqualTo("application/json");
        assertThat(exchange.getResponse().getBodyAsString().block())
                .isEqualTo("{\"error\":{\"message\":\"slow down\",\"type\":\"tokens\",\"param\":null,"
                        + "\"code\":\"rate_limit_exceeded\"}}");
    }

    @Test
    void unauthorizedAsksForBearer() {
        MockServerWebExchange exchange = MockServerWebExchange.from(MockServerHttpRequest.get("/v1/models"));
        errors.write(exchange, OpenAiErrors.unauthorized("no key")).block();
        assertThat(exchange.getResponse().getHeaders().getFirst("WWW-Authenticate")).isEqualTo("Bearer");
    }
}
