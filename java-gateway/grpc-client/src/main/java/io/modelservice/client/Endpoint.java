package io.modelservice.client;

/** One model-service instance's gRPC address, as found in Nacos (ip + metadata {@code gRPC_port}). */
public record Endpoint(String host, int port, String model) {
    @Override
    public String toString() {
        return host + ":" + port;
    }
}
