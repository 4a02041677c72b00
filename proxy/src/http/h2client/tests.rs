use super::*;
use http_body_util::{BodyExt, StreamBody};
use std::convert::Infallible;
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/2 server (hyper's) that echoes each request's body and trailers, answering with
/// its head at once so a body still streaming is sent after the answer has come.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async {
                    let mut resp = Response::new(req.into_body());
                    resp.headers_mut().insert("x-echo", "1".parse().unwrap());
                    Ok::<_, Infallible>(resp)
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    addr
}

async fn connect(addr: std::net::SocketAddr, keep_alive: Option<KeepAlive>) -> H2Sender {
    let tcp = TcpStream::connect(addr).await.unwrap();
    H2Sender::handshake(Coalesce::new(tcp), keep_alive, addr)
        .await
        .unwrap()
}

type Frame1 = Result<Frame<Bytes>, std::io::Error>;
type Frames = tokio::sync::mpsc::Sender<Frame1>;
type Streaming = StreamBody<tokio_stream::wrappers::ReceiverStream<Frame1>>;

/// A request whose body frames the test sends one by one.
fn streaming_request() -> (Request<Streaming>, Frames) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::builder()
        .method("POST")
        .uri("http://echo/upload")
        .body(body)
        .unwrap();
    (req, tx)
}

fn within<F: Future>(f: F) -> tokio::time::Timeout<F> {
    tokio::time::timeout(Duration::from_secs(5), f)
}

#[tokio::test]
async fn body_and_trailers_go_both_ways() {
    let sender = connect(echo_server().await, None).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"hello "))),
        Ok(Frame::data(Bytes::from(vec![b'x'; 100_000]))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::builder()
        .method("POST")
        .uri("http://echo/grpc")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let resp = within(sender.send(req)).await.unwrap().unwrap();
    assert_eq!(resp.headers()["x-echo"], "1");
    let got = within(resp.into_body().collect()).await.unwrap().unwrap();
    assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
    let data = got.to_bytes();
    assert_eq!(
        data.len(),
        6 + 100_000,
        "the whole body, past one flow-control step"
    );
    assert!(data.starts_with(b"hello x"));
}

#[tokio::test]
async fn a_body_still_streaming_when_the_answer_comes_is_sent_on() {
    let sender = connect(echo_server().await, None).await;
    let (req, frames) = streaming_request();
    frames
        .send(Ok(Frame::data(Bytes::from_static(b"one "))))
        .await
        .unwrap();
    // The answer's head comes while the body is still open.
    let resp = within(sender.send(req)).await.unwrap().unwrap();
    let mut body = resp.into_body();
    let first = within(body.frame()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "one ");
    frames
        .send(Ok(Frame::data(Bytes::from_static(b"two"))))
        .await
        .unwrap();
    drop(frames);
    let rest = within(body.collect()).await.unwrap().unwrap().to_bytes();
    assert_eq!(rest, "two");
}

#[tokio::test]
async fn a_closed_connection_gives_the_request_back_unsent() {
    // A peer that completes the handshake, then closes the connection with a GOAWAY.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(tcp).await.unwrap();
        conn.graceful_shutdown();
        while conn.accept().await.is_some() {}
    });
    let sender = connect(addr, None).await;
    within(async {
        while !sender.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the connection's end is noticed");
    let req = Request::builder()
        .uri("http://echo/again")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    match sender.send(req).await {
        Err(SendError::Unsent(back, _)) => assert_eq!(back.uri().path(), "/again"),
        other => panic!("expected the request back, got {other:?}"),
    }
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    // A peer that completes the handshake and then never reads again: pings go unanswered.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hold_tx, hold) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let conn = h2::server::handshake(tcp).await.unwrap();
        let _ = hold.await;
        drop(conn);
    });
    let keep_alive = KeepAlive {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(100),
    };
    let sender = connect(addr, Some(keep_alive)).await;
    within(async {
        while !sender.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("closed once a ping went unanswered");
    drop(hold_tx);
}

#[tokio::test]
async fn a_peer_that_answers_pings_is_kept() {
    let keep_alive = KeepAlive {
        interval: Duration::from_millis(20),
        timeout: Duration::from_millis(500),
    };
    let sender = connect(echo_server().await, Some(keep_alive)).await;
    // Several ping rounds pass; the connection stays and still carries requests.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!sender.is_closed());
    let req = Request::builder()
        .uri("http://echo/")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = within(sender.send(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
}
