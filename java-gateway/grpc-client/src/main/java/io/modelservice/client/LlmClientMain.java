package io.modelservice.client;

import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;

import io.grpc.StatusRuntimeException;
import io.modelservice.llm.v1.ChatMessage;
import io.modelservice.llm.v1.ChatRequest;
import io.modelservice.llm.v1.ChatResponse;
import io.modelservice.llm.v1.ChatStreamResponse;
import io.modelservice.llm.v1.Usage;

/**
 * The "business service" example: finds a model-service pod through Nacos and asks it a question over gRPC.
 *
 * <pre>
 * java -jar grpc-client/target/llm-grpc-client.jar --nacos 127.0.0.1:8848 "What is the capital of France?"
 * </pre>
 * The answer goes to stdout; diagnostics and the usage line to stderr. Exit code 0 on success, 1 on a call error,
 * 2 on bad arguments.
 */
public final class LlmClientMain {

    static final String USAGE = """
            usage: java -jar llm-grpc-client.jar [options] QUESTION
              --nacos HOST:PORT      Nacos server (default 127.0.0.1:8848, or $NACOS_SERVER_ADDR)
              --namespace ID         Nacos namespace (default: public)
              --service NAME         Nacos service name (default model-service)
              --group NAME           Nacos group (default DEFAULT_GROUP)
              --target HOST:PORT     call this gRPC address directly instead of asking Nacos
              --model NAME           model name (default: the one the instance serves)
              --system TEXT          a system message
              --max-tokens N         most tokens to generate (default 64)
              --temperature T        sampling temperature (default 0 = greedy)
              --deadline-s S         deadline of the call in seconds (default 60)
              --stream               print the answer as it is generated (ChatStream)
              --api-key KEY          the model service's key (default $MODEL_SERVICE_API_KEY)
            """;

    private LlmClientMain() {
    }

    /** Parsed command line. */
    record Options(String nacos, String namespace, String service, String group, String target, String model,
                   String system, int maxTokens, double temperature, double deadlineSeconds, boolean stream,
                   String apiKey, String question) {
    }

    public static void main(String[] args) {
        System.exit(run(args, new PrintStream(System.out, true, StandardCharsets.UTF_8), System.err));
    }

    static int run(String[] args, PrintStream out, PrintStream err) {
        Options options;
        try {
            options = parse(args);
        } catch (IllegalArgumentException e) {
            err.println(e.getMessage());
            err.print(USAGE);
            return 2;
        }
        NacosEndpoints nacos = null;
        try {
            LlmClient.EndpointSource source;
            if (options.target() != null) {
                String[] hostPort = options.target().split(":");
                Endpoint fixed = new Endpoint(hostPort[0], Integer.parseInt(hostPort[1]), "");
                source = () -> List.of(fixed);
            } else {
                nacos = new NacosEndpoints(options.nacos(), options.namespace(), options.service(), options.group());
                NacosEndpoints found = nacos;
                source = found::healthy;
            }
            try (LlmClient client = new LlmClient(source, options.apiKey())) {
                ChatRequest request = request(options);
                Duration deadline = Duration.ofMillis((long) (options.deadlineSeconds() * 1000));
                Usage usage;
                if (options.stream()) {
                    ChatStreamResponse last = client.chatStream(request, deadline, message -> {
                        out.print(message.getText());
                        out.flush();
                    });
                    out.println();
                    usage = last == null ? null : last.getUsage();
                    if (last != null) {
                        err.println("finish_reason=" + last.getFinishReason());
                    }
                } else {
                    ChatResponse response = client.chat(request, deadline);
                    out.println(response.getText());
                    usage = response.getUsage();
                    err.println("finish_reason=" + response.getFinishReason());
                }
                if (usage != null) {
                    err.println("usage: prompt_tokens=" + usage.getPromptTokens() + " completion_tokens="
                            + usage.getCompletionTokens() + " total_tokens=" + usage.getTotalTokens());
                }
                return 0;
            }
        } catch (StatusRuntimeException e) {
            err.println("call failed: " + e.getStatus().getCode() + ": " + e.getStatus().getDescription());
            return 1;
        } catch (Exception e) {
            err.println("call failed: " + e);
            return 1;
        } finally {
            if (nacos != null) {
                try {
                    nacos.close();
                } catch (Exception ignored) {
                    // exiting anyway
                }
            }
        }
    }

    static ChatRequest request(Options o) {
        ChatRequest.Builder builder = ChatRequest.newBuilder()
                .setMaxTokens(o.maxTokens())
                .setTemperature(o.temperature());
        if (o.model() != null) {
            builder.setModel(o.model());
        }
        if (o.system() != null) {
            builder.addMessages(ChatMessage.newBuilder().setRole("system").setContent(o.system()));
        }
        builder.addMessages(ChatMessage.newBuilder().setRole("user").setContent(o.question()));
        return builder.build();
    }

    static Options parse(String[] args) {
        String nacos = envOr("NACOS_SERVER_ADDR", "127.0.0.1:8848");
        String namespace = null;
        String service = "model-service";
        String group = "DEFAULT_GROUP";
        String target = null;
        String model = null;
        String system = null;
        int maxTokens = 64;
        double temperature = 0;
        double deadline = 60;
        boolean stream = false;
        String apiKey = System.getenv("MODEL_SERVICE_API_KEY");
        List<String> words = new ArrayList<>();
        for (int i = 0; i < args.length; i++) {
            String arg = args[i];
            switch (arg) {
                case "--nacos" -> nacos = value(args, ++i, arg);
                case "--namespace" -> namespace = value(args, ++i, arg);
                case "--service" -> service = value(args, ++i, arg);
                case "--group" -> group = value(args, ++i, arg);
                case "--target" -> target = value(args, ++i, arg);
                case "--model" -> model = value(args, ++i, arg);
                case "--system" -> system = value(args, ++i, arg);
                case "--max-tokens" -> maxTokens = Integer.parseInt(value(args, ++i, arg));
                case "--temperature" -> temperature = Double.parseDouble(value(args, ++i, arg));
                case "--deadline-s" -> deadline = Double.parseDouble(value(args, ++i, arg));
                case "--stream" -> stream = true;
                case "--api-key" -> apiKey = value(args, ++i, arg);
                case "-h", "--help" -> throw new IllegalArgumentException("");
                default -> {
                    if (arg.startsWith("--")) {
                        throw new IllegalArgumentException("unknown option " + arg);
                    }
                    words.add(arg);
                }
            }
        }
        if (words.isEmpty()) {
            throw new IllegalArgumentException("missing QUESTION");
        }
        if (target != null && !target.matches("[^:]+:\\d+")) {
            throw new IllegalArgumentException("--target must be HOST:PORT");
        }
        return new Options(nacos, namespace, service, group, target, model, system, maxTokens, temperature, deadline,
                stream, apiKey, String.join(" ", words));
    }

    private static String value(String[] args, int i, String option) {
        if (i >= args.length) {
            throw new IllegalArgumentException(option + " needs a value");
        }
        return args[i];
    }

    private static String envOr(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isBlank() ? fallback : value;
    }
}
