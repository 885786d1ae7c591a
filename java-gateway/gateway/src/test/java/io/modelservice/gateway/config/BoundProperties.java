package io.modelservice.gateway.config;

import java.util.Map;

import org.springframework.boot.context.properties.bind.Binder;
import org.springframework.boot.context.properties.source.MapConfigurationPropertySource;

/** {@link GatewayProperties} bound the way Spring binds them at startup, from {@code llm-gateway.*} entries. */
public final class BoundProperties {

    private BoundProperties() {
    }

    /** The properties from these entries (keys without the {@code llm-gateway.} prefix); the defaults for the rest. */
    public static GatewayProperties of(Map<String, ?> entries) {
        MapConfigurationPropertySource source = new MapConfigurationPropertySource();
        entries.forEach((key, value) -> source.put("llm-gateway." + key, value));
        return new Binder(source).bindOrCreate("llm-gateway", GatewayProperties.class);
    }

    public static GatewayProperties defaults() {
        return of(Map.of());
    }
}
