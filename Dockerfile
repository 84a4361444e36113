# The image deploy/kubernetes runs. (Not built by CI: the CI machine has no container engine.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lakesync

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/lakesync /usr/local/bin/lakesync
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/lakesync"]
