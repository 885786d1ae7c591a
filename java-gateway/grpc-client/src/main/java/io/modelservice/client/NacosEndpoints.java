package io.modelservice.client;

import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.function.Function;

import com.alibaba.nacos.api.PropertyKeyConst;
import com.alibaba.nacos.api.exception.NacosException;
import com.alibaba.nacos.api.naming.NamingFactory;
import com.alibaba.nacos.api.naming.NamingService;
import com.alibaba.nacos.api.naming.pojo.Instance;

/**
 * Finds the healthy model-service instances in Nacos and their gRPC ports (instance metadata {@code gRPC_port};
 * the instance port itself is the HTTP port). The Nacos client keeps the list fresh by subscription.
 * <p>
 * A Nacos with auth on needs a login: the credentials come from {@code -Dnacos.username} / {@code -Dnacos.password},
 * else the environment variables {@code NACOS_USERNAME} / {@code NACOS_PASSWORD} (the names the gateway and the
 * model service read), never from the command line, where other users of the machine could read them.
 */
public final class NacosEndpoints implements AutoCloseable {

    public static final String GRPC_PORT_KEY = "gRPC_port";

    private final NamingService naming;
    private final String service;
    private final String group;

    public NacosEndpoints(String serverAddr, String namespace, String service, String group) throws NacosException {
        this.naming = NamingFactory.createNamingService(
                clientProperties(serverAddr, namespace, System::getProperty, System::getenv));
        this.service = service;
        this.group = group;
    }

    /** The Nacos client's settings: server, namespace and, when given, the login ({@code -D} before environment). */
    static Properties clientProperties(String serverAddr, String namespace, Function<String, String> systemProperties,
                                       Function<String, String> environment) {
        Properties properties = new Properties();
        properties.setProperty(PropertyKeyConst.SERVER_ADDR, serverAddr);
        if (namespace != null && !namespace.isBlank()) {
            properties.setProperty(PropertyKeyConst.NAMESPACE, namespace);
        }
        String username = firstSet(systemProperties.apply("nacos.username"), environment.apply("NACOS_USERNAME"));
        if (username != null) {
            properties.setProperty(PropertyKeyConst.USERNAME, username);
            String password = firstSet(systemProperties.apply("nacos.password"), environment.apply("NACOS_PASSWORD"));
            properties.setProperty(PropertyKeyConst.PASSWORD, password == null ? "" : password);
        }
        return properties;
    }

    private static String firstSet(String first, String second) {
        if (first != null && !first.isBlank()) {
            return first;
        }
        return second != null && !second.isBlank() ? second : null;
    }

    /** The healthy instances that advertise a gRPC port, in Nacos's order. */
    public List<Endpoint> healthy() throws NacosException {
        List<Endpoint> endpoints = new ArrayList<>();
        for (Instance instance : naming.selectInstances(service, group, true)) {
            Endpoint endpoint = toEndpoint(instance);
            if (endpoint != null) {
                endpoints.add(endpoint);
            }
        }
        return endpoints;
    }

    static Endpoint toEndpoint(Instance instance) {
        if (!instance.isEnabled() || !instance.isHealthy()) {
            return null;
        }
        String port = instance.getMetadata() == null ? null : instance.getMetadata().get(GRPC_PORT_KEY);
        if (port == null || port.isBlank()) {
            return null;
        }
        try {
            return new Endpoint(instance.getIp(), Integer.parseInt(port.trim()),
                    instance.getMetadata().getOrDefault("model", ""));
        } catch (NumberFormatException e) {
            return null;
        }
    }

    @Override
    public void close() throws NacosException {
        naming.shutDown();
    }
}
