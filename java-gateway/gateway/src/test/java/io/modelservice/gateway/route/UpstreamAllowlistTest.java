package io.modelservice.gateway.route;

import java.util.List;
import java.util.Map;

import io.micrometer.core.instrument.simple.SimpleMeterRegistry;
import io.modelservice.gateway.config.BoundProperties;
import io.modelservice.gateway.config.GatewayProperties;
import org.junit.jupiter.api.Test;

import static org.assertj.core.api.Assertions.assertThat;
import static org.assertj.core.api.Assertions.assertThatThrownBy;

class UpstreamAllowlistTest {

    static UpstreamAllowlist allowing(String... cidrs) {
        GatewayProperties properties = BoundProperties.of(Map.of("upstream.allowed-networks", List.of(cidrs)));
        return new UpstreamAllowlist(properties, new SimpleMeterRegistry());
    }

    @Test
    void theDefaultIsLoopbackOnly() {
        UpstreamAllowlist loopback = new UpstreamAllowlist(BoundProperties.defaults(), new SimpleMeterRegistry());
        assertThat(loopback.allowed("127.0.0.1")).isTrue();
        assertThat(loopback.allowed("127.0.0.2")).isTrue();
        assertThat(loopback.allowed("::1")).isTrue();
        assertThat(loopback.allowed("[::1]")).isTrue();
        assertThat(loopback.allowed("10.0.0.5")).isFalse();
        assertThat(loopback.allowed("192.168.1.10")).isFalse();
    }

    @Test
    void matchesPrefixesBitByBit() {
        UpstreamAllowlist pods = allowing("10.244.0.0/14", "fd00:10::/32");
        assertThat(pods.allowed("10.244.1.7")).isTrue();
        assertThat(pods.allowed("10.247.255.255")).isTrue();
        assertThat(pods.allowed("10.248.0.1")).isFalse();
        assertThat(pods.allowed("10.243.255.255")).isFalse();
        assertThat(pods.allowed("fd00:10::17")).isTrue();
        assertThat(pods.allowed("fd00:11::17")).isFalse();
        assertThat(pods.allowed("127.0.0.1")).isFalse();
        assertThat(allowing("127.0.0.1/32").allowed("127.0.0.2")).isFalse();
        assertThat(allowing("0.0.0.0/0").allowed("8.8.8.8")).isTrue();
    }

    @Test
    void hostNamesAreNeverLookedUpAndNeverAllowed() {
        UpstreamAllowlist all = allowing("0.0.0.0/0", "::/0");
        assertThat(all.allowed("localhost")).isFalse();
        assertThat(all.allowed("pod.example.com")).isFalse();
        assertThat(all.allowed("127.0.0.1.nip.io")).isFalse();
        assertThat(all.allowed("")).isFalse();
        assertThat(all.allowed(null)).isFalse();
    }

    @Test
    void refusesToStartOnABadNetwork() {
        assertThatThrownBy(() -> allowing("10.0.0.0/33")).isInstanceOf(IllegalArgumentException.class);
        assertThatThrownBy(() -> allowing("pods/8")).isInstanceOf(IllegalArgumentException.class);
        assertThatThrownBy(() -> allowing("10.0.0.0/x")).isInstanceOf(IllegalArgumentException.class);
    }

    @Test
    void countsEachRefusal() {
        SimpleMeterRegistry registry = new SimpleMeterRegistry();
        GatewayProperties properties = BoundProperties.defaults();
        UpstreamAllowlist allowlist = new UpstreamAllowlist(properties, registry);
        assertThat(allowlist.admits("10.0.0.9", 8000)).isFalse();
        assertThat(allowlist.admits("10.0.0.9", 8000)).isFalse();
        assertThat(allowlist.admits("127.0.0.1", 8000)).isTrue();
        assertThat(registry.counter("llm_gateway_upstream_refused").count()).isEqualTo(2.0);
    }
}
