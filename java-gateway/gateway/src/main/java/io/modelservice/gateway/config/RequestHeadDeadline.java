package io.modelservice.gateway.config;

import java.time.Duration;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.TimeUnit;

import io.netty.channel.ChannelDuplexHandler;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelPromise;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.LastHttpContent;

/**
 * Closes a connection whose request head (request line and headers) is not complete within a fixed time from the
 * moment the connection opened, or the previous response ended. Unlike the idle timeout, a byte now and then
 * does not restart it, so a client that trickles its headers ("slowloris") is cut off too.
 *
 * <p>Sits after Reactor Netty's HTTP codec and traffic handler: it sees a request head once the server takes it up
 * (a pipelined request only after the previous response), and each response's end as it is written.
 */
final class RequestHeadDeadline extends ChannelDuplexHandler {

    static final String NAME = "llm-gateway.requestHeadDeadline";

    private final long nanos;
    private ScheduledFuture<?> timer;

    RequestHeadDeadline(Duration deadline) {
        this.nanos = deadline.toNanos();
    }

    @Override
    public void handlerAdded(ChannelHandlerContext ctx) {
        if (ctx.channel().isActive()) {
            arm(ctx);
        }
    }

    @Override
    public void channelActive(ChannelHandlerContext ctx) throws Exception {
        arm(ctx);
        super.channelActive(ctx);
    }

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) throws Exception {
        if (msg instanceof HttpRequest) {
            disarm();
        }
        super.channelRead(ctx, msg);
    }

    @Override
    public void write(ChannelHandlerContext ctx, Object msg, ChannelPromise promise) throws Exception {
        if (msg instanceof LastHttpContent) {
            arm(ctx);  // the response ends: the next request head must come in time as well
        }
        super.write(ctx, msg, promise);
    }

    @Override
    public void handlerRemoved(ChannelHandlerContext ctx) {
        disarm();
    }

    @Override
    public void channelInactive(ChannelHandlerContext ctx) throws Exception {
        disarm();
        super.channelInactive(ctx);
    }

    private void arm(ChannelHandlerContext ctx) {
        disarm();
        timer = ctx.executor().schedule(() -> {
            ctx.close();
        }, nanos, TimeUnit.NANOSECONDS);
    }

    private void disarm() {
        if (timer != null) {
            timer.cancel(false);
            timer = null;
        }
    }
}
