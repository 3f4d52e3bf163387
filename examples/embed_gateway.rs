//! Another Rust service mounting ProxyPal's gateway: its own `/healthz` beside
//! the OpenAI-compatible `/v1/*` served through a pool of keys, in front of
//! the simulated NVIDIA API (no account, no internet).
//!
//! ```sh
//! cargo run --example embed_gateway
//! ```
//!
//! It serves on 127.0.0.1, sends itself a plain and a streaming chat
//! completion through the gateway, prints what came back and which key
//! served it, and exits.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxypal::gateway::keypool::KeySpec;
use proxypal::gateway::{Gateway, GatewayConfig, Handle, ProxyBody};
use proxypal_nim_sim::{SimConfig, SimServer, generate_test_keys};

/// The service: `/v1/*` goes to the gateway, the rest is the embedder's own.
async fn route(gateway: Handle, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    if req.uri().path().starts_with("/v1/") {
        return Ok(gateway.handle(req).await);
    }
    let own = format!("my service; keys ready: {}", gateway.gateway().key_reports().len());
    Ok(Response::new(proxypal::gateway::full(own)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The upstream: a simulated NVIDIA API that knows these three keys.
    let keys = generate_test_keys(3);
    let sim = SimServer::start(SimConfig::default().with_keys(keys.clone()))?;

    // The gateway: the keys (40/min each by default), metrics in our registry.
    let mut registry = prometheus_client::registry::Registry::with_prefix("myservice");
    let mut config = GatewayConfig::with_keys(keys.iter().map(|k| KeySpec::new(k.as_str())));
    config.providers[0].upstream.base_url = sim.base_url().parse()?;
    let gateway = Gateway::new(config, &mut registry)?;
    let handle = Handle::new(gateway);

    // Our server: hyper's accept loop with the gateway mounted under /v1.
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let serving = handle.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handle = serving.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| route(handle.clone(), req));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });

    // A client of our service, as an OpenAI SDK would be.
    let client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for stream in [false, true] {
        let body = format!(
            r#"{{"model":"meta/llama-3.1-8b-instruct","stream":{stream},"messages":[{{"role":"user","content":"Hello"}}]}}"#
        );
        let req = Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = client.request(req).await?;
        let status = resp.status();
        let text = resp.into_body().collect().await?.to_bytes();
        println!("stream={stream}: {status}, {} bytes", text.len());
        if !status.is_success() {
            return Err(format!("the gateway answered {status}: {}", String::from_utf8_lossy(&text)).into());
        }
    }
    let own = client.get(format!("http://{addr}/healthz").parse()?).await?;
    println!("/healthz: {}", String::from_utf8_lossy(&own.into_body().collect().await?.to_bytes()));

    for key in handle.gateway().key_reports() {
        println!(
            "{}: {} requests, {}",
            key.snapshot.label,
            key.snapshot.counters.requests,
            key.snapshot.status.as_str()
        );
    }
    sim.shutdown().await;
    Ok(())
}
