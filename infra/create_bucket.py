"""Create the output bucket for cdam runs (any S3-compatible endpoint through the standard AWS settings).

    python infra/create_bucket.py my-output-bucket [--region us-east-1] [--expire-days 90]

Blocks public access, turns on default encryption, and optionally expires objects under cdam/
after N days. Uses boto3 with the usual AWS_* environment, profiles or instance role.
"""

from __future__ import annotations

import argparse

import boto3
from botocore.exceptions import ClientError


def create_bucket(name: str, region: str, expire_days: int | None) -> None:
    s3 = boto3.client("s3", region_name=region)
    try:
        if region == "us-east-1":
            s3.create_bucket(Bucket=name)
        else:
            s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
    except ClientError as error:
        if error.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
            raise SystemExit(f"cannot create bucket {name}: {error.response['Error']['Message']}") from None
    s3.put_public_access_block(
        Bucket=name,
        PublicAccessBlockConfiguration={
            k: True for k in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")
        },
    )
    s3.put_bucket_encryption(
        Bucket=name,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    if expire_days:
        rule = {
            "ID": "expire-cdam-runs",
            "Status": "Enabled",
            "Filter": {"Prefix": "cdam/"},
            "Expiration": {"Days": expire_days},
        }
        s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": [rule]})
    print(f"bucket {name} ready in {region}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bucket")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--expire-days", type=int, default=None, help="expire objects under cdam/ after this many days")
    args = parser.parse_args()
    create_bucket(args.bucket, args.region, args.expire_days)


if __name__ == "__main__":
    main()
