package io.modelservice.gateway.auth;

import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.interfaces.RSAPrivateKey;
import java.util.Base64;
import java.util.Date;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

import com.nimbusds.jose.JWSAlgorithm;
import com.nimbusds.jose.JWSHeader;
import com.nimbusds.jose.crypto.MACSigner;
import com.nimbusds.jose.crypto.RSASSASigner;
import com.nimbusds.jwt.JWTClaimsSet;
import com.nimbusds.jwt.SignedJWT;
import io.modelservice.gateway.config.BoundProperties;
import io.modelservice.gateway.config.GatewayProperties;
import org.junit.jupiter.api.Test;

import static org.assertj.core.api.Assertions.assertThat;
import static org.assertj.core.api.Assertions.assertThatThrownBy;

class AuthenticatorTest {

    static final String SECRET = "0123456789abcdef0123456789abcdef-hs256-test-secret";

    static Map<String, Object> aliceKey() {
        Map<String, Object> p = new HashMap<>();
        p.put("api-keys[0].name", "alice");
        p.put("api-keys[0].sha256", Authenticator.sha256Hex("sk-alice"));
        p.put("api-keys[0].models", List.of("smollm2-135m-instruct"));
        p.put("api-keys[0].requests-per-minute", 5);
        p.put("api-keys[0].tokens-per-minute", 100);
        return p;
    }

    static GatewayProperties properties() {
        return BoundProperties.of(aliceKey());
    }

    @Test
    void acceptsAConfiguredKeyByItsHash() {
        Caller caller = new Authenticator(properties()).authenticate("Bearer sk-alice");
        assertThat(caller.name()).isEqualTo("alice");
        assertThat(caller.method()).isEqualTo("api_key");
        assertThat(caller.requestsPerMinute()).isEqualTo(5);
        assertThat(caller.tokensPerMinute()).isEqualTo(100);
        assertThat(caller.mayUse("smollm2-135m-instruct")).isTrue();
        assertThat(caller.mayUse("other")).isFalse();
        assertThat(caller.mayUse(null)).isFalse();  // a restricted caller must name its model
        // the scheme is case-insensitive, surrounding blanks are ignored
        assertThat(new Authenticator(properties()).authenticate("  bearer   sk-alice ").name()).isEqualTo("alice");
    }

    @Test
    void refusesMissingMalformedAndWrongKeys() {
        Authenticator auth = new Authenticator(properties());
        assertThatThrownBy(() -> auth.authenticate(null)).isInstanceOf(AuthenticationException.class)
                .hasMessageContaining("didn't provide an API key");
        assertThatThrownBy(() -> auth.authenticate("")).isInstanceOf(AuthenticationException.class);
        assertThatThrownBy(() -> auth.authenticate("Basic c2stYWxpY2U=")).isInstanceOf(AuthenticationException.class);
        assertThatThrownBy(() -> auth.authenticate("Bearer ")).isInstanceOf(AuthenticationException.class);
        assertThatThrownBy(() -> auth.authenticate("Bearer sk-alicf")).isInstanceOf(AuthenticationException.class)
                .hasMessage("Incorrect API key provided.");
        // the hash itself is not a key
        assertThatThrownBy(() -> auth.authenticate("Bearer " + Authenticator.sha256Hex("sk-alice")))
                .isInstanceOf(AuthenticationException.class);
    }

    @Test
    void messagesNeverEchoTheCredential() {
        Authenticator auth = new Authenticator(properties());
        assertThatThrownBy(() -> auth.authenticate("Bearer sk-secret-value"))
                .satisfies(e -> assertThat(e.getMessage()).doesNotContain("sk-secret-value"));
    }

    @Test
    void sha256MatchesTheShellRecipe() {
        // printf %s abc | sha256sum
        assertThat(Authenticator.sha256Hex("abc"))
                .isEqualTo("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    private static GatewayProperties withJwt(String rsaPem) {
        Map<String, Object> p = aliceKey();
        p.put("jwt.enabled", true);
        p.put("jwt.hmac-secret", SECRET);
        p.put("jwt.rsa-public-key", rsaPem == null ? "" : rsaPem);
        p.put("jwt.issuer", "https://idp.example");
        p.put("jwt.audience", "llm-gateway");
        p.put("jwt.requests-per-minute", 7);
        p.put("jwt.tokens-per-minute", 700);
        return BoundProperties.of(p);
    }

    private static JWTClaimsSet.Builder claims(long expiresInSeconds) {
        return new JWTClaimsSet.Builder().subject("svc-billing").issuer("https://idp.example")
                .audience("llm-gateway").expirationTime(new Date(System.currentTimeMillis() + expiresInSeconds * 1000));
    }

    private static String hs256(JWTClaimsSet claims, String secret) throws Exception {
        SignedJWT jwt = new SignedJWT(new JWSHeader(JWSAlgorithm.HS256), claims);
        jwt.sign(new MACSigner(secret));
        return jwt.serialize();
    }

    @Test
    void acceptsAValidHs256Jwt() throws Exception {
        Authenticator auth = new Authenticator(withJwt(null));
        Caller caller = auth.authenticate("Bearer " + hs256(claims(300).claim("models", List.of("m1")).build(), SECRET));
        assertThat(caller.name()).isEqualTo("svc-billing");
        assertThat(caller.method()).isEqualTo("jwt");
        assertThat(caller.requestsPerMinute()).isEqualTo(7);
        assertThat(caller.mayUse("m1")).isTrue();
        assertThat(caller.mayUse("m2")).isFalse();
        // API keys keep working next to JWTs
        assertThat(auth.authenticate("Bearer sk-alice").name()).isEqualTo("alice");
    }

    @Test
    void refusesBadJwts() throws Exception {
        Authenticator auth = new Authenticator(withJwt(null));
        String wrongSecret = hs256(claims(300).build(), SECRET.replace('0', '1'));
        assertThatThrownBy(() -> auth.authenticate("Bearer " + wrongSecret)).isInstanceOf(AuthenticationException.class);
        String expired = hs256(claims(-600).build(), SECRET);
        assertThatThrownBy(() -> auth.authenticate("Bearer " + expired)).hasMessageContaining("expired");
        String wrongIssuer = hs256(claims(300).issuer("https://evil.example").build(), SECRET);
        assertThatThrownBy(() -> auth.authenticate("Bearer " + wrongIssuer)).hasMessageContaining("issuer");
        String wrongAudience = hs256(claims(300).audience("other").build(), SECRET);
        assertThatThrownBy(() -> auth.authenticate("Bearer " + wrongAudience)).hasMessageContaining("audience");
        String noExpiry = hs256(new JWTClaimsSet.Builder().subject("x").issuer("https://idp.example")
                .audience("llm-gateway").build(), SECRET);
        assertThatThrownBy(() -> auth.authenticate("Bearer " + noExpiry)).isInstanceOf(AuthenticationException.class);
        // alg "none" (unsigned) is never accepted
        String header = Base64.getUrlEncoder().withoutPadding().encodeToString("{\"alg\":\"none\"}".getBytes());
        String body = Base64.getUrlEncoder().withoutPadding().encodeToString(
                claims(300).build().toString().getBytes());
        assertThatThrownBy(() -> auth.authenticate("Bearer " + header + "." + body + "."))
                .isInstanceOf(AuthenticationException.class);
    }

    @Test
    void acceptsRs256WithTheConfiguredPublicKey() throws Exception {
        KeyPairGenerator generator = KeyPairGenerator.getInstance("RSA");
        generator.initialize(2048);
        KeyPair pair = generator.generateKeyPair();
        String pem = "-----BEGIN PUBLIC KEY-----\n"
                + Base64.getMimeEncoder(64, "\n".getBytes()).encodeToString(pair.getPublic().getEncoded())
                + "\n-----END PUBLIC KEY-----\n";
        Authenticator auth = new Authenticator(withJwt(pem));
        SignedJWT jwt = new SignedJWT(new JWSHeader(JWSAlgorithm.RS256), claims(300).build());
        jwt.sign(new RSASSASigner((RSAPrivateKey) pair.getPrivate()));
        assertThat(auth.authenticate("Bearer " + jwt.serialize()).name()).isEqualTo("svc-billing");

        KeyPair other = generator.generateKeyPair();
        SignedJWT forged = new SignedJWT(new JWSHeader(JWSAlgorithm.RS256), claims(300).build());
        forged.sign(new RSASSASigner((RSAPrivateKey) other.getPrivate()));
        assertThatThrownBy(() -> auth.authenticate("Bearer " + forged.serialize()))
                .isInstanceOf(AuthenticationException.class);
    }
}
