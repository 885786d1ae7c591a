package io.modelservice.gateway.route;

import java.net.InetAddress;
import java.net.UnknownHostException;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.regex.Pattern;

import io.micrometer.core.instrument.Counter;
import io.micrometer.core.instrument.MeterRegistry;
import io.modelservice.gateway.config.GatewayProperties;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.cloud.client.ServiceInstance;
import org.springframework.stereotype.Component;

/**
 * The networks the gateway may send requests to ({@code llm-gateway.upstream.allowed-networks}). Whoever can write
 * to Nacos can register an instance; without this check such an instance would receive callers' prompts and the
 * internal key. An instance outside the networks (or registered with a host name, which would need a DNS lookup
 * to check) is dropped from load balancing, logged once per instance and counted.
 */
@Component
public class UpstreamAllowlist {

    private static final Logger log = LoggerFactory.getLogger(UpstreamAllowlist.class);
    // IP literals only: InetAddress.getByName never resolves these, so checking one is free and cannot be fooled by
    // DNS. (An IPv6 literal has a ':'; brackets are stripped first.)
    private static final Pattern IPV4 = Pattern.compile("\\d{1,3}(\\.\\d{1,3}){3}");
    /** At most this many distinct refused instances are remembered for warn-once (a flood logs once more each). */
    private static final int MAX_WARNED = 10_000;

    private final List<Network> networks = new ArrayList<>();
    private final Set<String> warned = ConcurrentHashMap.newKeySet();
    private final Counter refused;

    public UpstreamAllowlist(GatewayProperties properties, MeterRegistry registry) {
        for (String cidr : properties.upstream().allowedNetworks()) {
            networks.add(Network.parse(cidr));
        }
        this.refused = Counter.builder("llm_gateway_upstream_refused")
                .description("Instances dropped from load balancing because their address is outside "
                        + "llm-gateway.upstream.allowed-networks (counted each time one is dropped)")
                .register(registry);
        log.info("upstream instances allowed in {}", properties.upstream().allowedNetworks());
    }

    /** Whether requests may go to this instance; logs (once) and counts a refusal. */
    public boolean admits(ServiceInstance instance) {
        return admits(instance.getHost(), instance.getPort());
    }

    /** Whether requests may go to this host (an IP literal inside an allowed network). */
    public boolean admits(String host, int port) {
        if (allowed(host)) {
            return true;
        }
        refused.increment();
        String key = InstanceBreakers.key(host, port);
        if (warned.size() < MAX_WARNED ? warned.add(key) : !warned.contains(key)) {
            log.atWarn().addKeyValue("instance", key)
                    .log("ignoring a model-service instance outside llm-gateway.upstream.allowed-networks");
        }
        return false;
    }

    boolean allowed(String host) {
        InetAddress address = literal(host);
        if (address == null) {
            return false;
        }
        for (Network network : networks) {
            if (network.contains(address)) {
                return true;
            }
        }
        return false;
    }

    /** The address of an IP literal, or null for anything else (a host name is not looked up). */
    static InetAddress literal(String host) {
        if (host == null) {
            return null;
        }
        String h = host.startsWith("[") && host.endsWith("]") ? host.substring(1, host.length() - 1) : host;
        if (!IPV4.matcher(h).matches() && !(h.contains(":") && h.matches("[0-9A-Fa-f:.]+"))) {
            return null;
        }
        try {
            return InetAddress.getByName(h);
        } catch (UnknownHostException e) {
            return null;
        }
    }

    /** One CIDR block. */
    record Network(byte[] prefix, int bits) {

        static Network parse(String cidr) {
            String value = cidr.trim();
            int slash = value.indexOf('/');
            InetAddress address = literal(slash < 0 ? value : value.substring(0, slash));
            if (address == null) {
                throw new IllegalArgumentException("llm-gateway.upstream.allowed-networks: not a CIDR: " + cidr);
            }
            int max = address.getAddress().length * 8;
            int bits;
            try {
                bits = slash < 0 ? max : Integer.parseInt(value.substring(slash + 1));
            } catch (NumberFormatException e) {
                throw new IllegalArgumentException("llm-gateway.upstream.allowed-networks: not a CIDR: " + cidr);
            }
            if (bits < 0 || bits > max) {
                throw new IllegalArgumentException("llm-gateway.upstream.allowed-networks: bad prefix length: "
                        + cidr);
            }
            return new Network(address.getAddress(), bits);
        }

        boolean contains(InetAddress address) {
            byte[] bytes = address.getAddress();
            if (bytes.length != prefix.length) {
                return false;  // an IPv4 block never contains an IPv6 address, nor the reverse
            }
            int full = bits / 8;
            for (int i = 0; i < full; i++) {
                if (bytes[i] != prefix[i]) {
                    return false;
                }
            }
            int rest = bits % 8;
            if (rest == 0) {
                return true;
            }
            int mask = (0xff << (8 - rest)) & 0xff;
            return (bytes[full] & mask) == (prefix[full] & mask);
        }
    }
}
