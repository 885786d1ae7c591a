# syntax=docker/dockerfile:1
# The LLM gateway (Spring Cloud Gateway, java-gateway/gateway): a Maven build, then a JRE-only image.
#   docker build -f docker/gateway.Dockerfile -t llm-gateway .                 (context: the repository root)
# Configuration by environment (see docs/gateway.md): NACOS_SERVER_ADDR, MODEL_SERVICE_API_KEY (the internal
# key the model services check), NACOS_USERNAME / NACOS_PASSWORD, LLM_GATEWAY_API_KEYS_0_NAME /
# LLM_GATEWAY_API_KEYS_0_SHA256 / ..., GATEWAY_PORT, GATEWAY_MANAGEMENT_PORT (actuator, on loopback by default),
# GATEWAY_UPSTREAM_ALLOWED_NETWORKS (set it to the network of the model services).
FROM maven:3.9-eclipse-temurin-17 AS build
WORKDIR /src
COPY proto/ proto/
COPY java-gateway/ java-gateway/
# only the gateway module (and what it depends on); the Maven repository is cached between builds
RUN --mount=type=cache,target=/root/.m2 \
    cd java-gateway && mvn -B -ntp -DskipTests -pl gateway -am package

FROM eclipse-temurin:17-jre
# curl for the health check
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app
WORKDIR /app
COPY --from=build /src/java-gateway/gateway/target/llm-gateway.jar /app/llm-gateway.jar
USER 10001
ENV JAVA_TOOL_OPTIONS="-XX:MaxRAMPercentage=75 -XX:+ExitOnOutOfMemoryError"
EXPOSE 8080
# actuator is not on the public port: the health check asks the management port, inside the container
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 CMD \
  curl -fsS http://127.0.0.1:${GATEWAY_MANAGEMENT_PORT:-8081}/actuator/health/readiness || exit 1
# SIGTERM: graceful shutdown (server.shutdown=graceful, up to 30 s for requests in flight)
ENTRYPOINT ["java", "-jar", "/app/llm-gateway.jar"]
